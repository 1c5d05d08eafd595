"""The prompt context of a prompt function, and composable prompt formatting.

A context is a list of chat messages. Inside a `@ppl` function every expression statement
adds to it: a string (or formatted value) extends the current user message, a `Message`
(`system(...)`, `user(...)`, `assistant(...)`) starts a message of that role, and a `gen()`
future becomes an assistant message whose text is filled in when the call finishes. Futures
stay unresolved in the context; a later call that reads the context waits for them then.

Formatting objects render themselves when added: `NumberedList(items)`, `BulletList(items)`,
`Tagged(tag, content)` (an XML-style section), `Lines(*parts)`; they nest.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Message:
    """One chat message; `parts` are strings or `Gen` futures, joined by newlines when sent."""

    role: str
    parts: list[Any] = field(default_factory=list)

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role = {self.role!r}: allowed {', '.join(ROLES)}")

    def futures(self) -> list[Any]:
        return [f for p in self.parts for f in futures_in(p)]

    def render(self) -> dict[str, str]:
        """{"role", "content"}, resolving futures (call only when they are done or may block)."""
        return {"role": self.role, "content": "\n".join(str(p) for p in self.parts)}


def system(*parts: Any) -> Message:
    return Message("system", [render(p) for p in parts])


def user(*parts: Any) -> Message:
    return Message("user", [render(p) for p in parts])


def assistant(*parts: Any) -> Message:
    return Message("assistant", [render(p) for p in parts])


class Format:
    """A composable piece of prompt text; it stays unrendered (its futures pending) until a
    call sends it."""

    def text(self) -> str:
        raise NotImplementedError

    def children(self) -> list[Any]:
        raise NotImplementedError

    def __str__(self) -> str:
        return self.text()


@dataclass
class NumberedList(Format):
    items: Iterable[Any]
    start: int = 1

    def __post_init__(self):
        self.items = list(self.items)

    def text(self) -> str:
        return "\n".join(f"{i}. {x}" for i, x in enumerate(self.items, self.start))

    def children(self) -> list[Any]:
        return self.items


@dataclass
class BulletList(Format):
    items: Iterable[Any]
    bullet: str = "-"

    def __post_init__(self):
        self.items = list(self.items)

    def text(self) -> str:
        return "\n".join(f"{self.bullet} {x}" for x in self.items)

    def children(self) -> list[Any]:
        return self.items


@dataclass
class Tagged(Format):
    """`<tag>` content `</tag>` on their own lines."""

    tag: str
    content: Any

    def text(self) -> str:
        return f"<{self.tag}>\n{self.content}\n</{self.tag}>"

    def children(self) -> list[Any]:
        return [self.content]


class Lines(Format):
    def __init__(self, *parts: Any):
        self.parts = parts

    def text(self) -> str:
        return "\n".join(str(p) for p in self.parts)

    def children(self) -> list[Any]:
        return list(self.parts)


def render(value: Any) -> Any:
    """What a message part holds: strings, futures and formatting objects as they are (the
    last two resolve when sent), anything else as its str()."""
    from executor.prompts.future import Gen

    return value if isinstance(value, (str, Gen, Format)) else str(value)


def futures_in(value: Any) -> list[Any]:
    """The `Gen` futures in a message part, formatting objects searched through."""
    from executor.prompts.future import Gen

    if isinstance(value, Gen):
        return [value]
    if isinstance(value, Format):
        return [f for child in value.children() for f in futures_in(child)]
    return []


class PromptContext:
    """The messages a prompt function has built so far."""

    def __init__(self, messages: list[Message] | None = None):
        self.messages: list[Message] = messages or []

    def copy(self) -> PromptContext:
        return PromptContext([Message(m.role, list(m.parts)) for m in self.messages])

    def add(self, value: Any) -> None:
        """What an expression statement does: None is ignored (a bare call for its effect)."""
        from executor.prompts.future import Gen

        if value is None:
            return
        if isinstance(value, Message):
            self.messages.append(value)
        elif isinstance(value, Gen):
            self.messages.append(Message("assistant", [value]))
        elif isinstance(value, (list, tuple)) and all(isinstance(v, Message) for v in value):
            self.messages.extend(value)
        else:
            self._user_part(render(value))

    def _user_part(self, part: Any) -> None:
        if not self.messages or self.messages[-1].role != "user":
            self.messages.append(Message("user"))
        self.messages[-1].parts.append(part)

    def futures(self) -> list[Any]:
        return [f for m in self.messages for f in m.futures()]

    def render(self) -> list[dict[str, str]]:
        return [m.render() for m in self.messages]
