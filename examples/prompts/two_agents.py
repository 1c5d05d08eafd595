"""Two agents in conversation: a customer and a shop assistant, each a prompt function with
its own system prompt, taking turns; each sees the other's lines as user messages.

    python examples/prompts/two_agents.py [--trace chat.jsonl]
"""

from __future__ import annotations

from executor.prompts import assistant, gen, ppl, user

TURNS = 3


@ppl
def customer(history: list[tuple[str, str]]):
    """You are a customer at a bicycle shop looking for a commuter bike. Reply in one sentence."""
    for speaker, line in history:
        user(line) if speaker == "shop" else assistant(line)
    if not history:
        "Start the conversation."
    return gen(max_tokens=48)


@ppl
def shop(history: list[tuple[str, str]]):
    """You are a helpful bicycle shop assistant. Reply in one or two sentences."""
    for speaker, line in history:
        user(line) if speaker == "customer" else assistant(line)
    return gen(max_tokens=64)


def conversation(turns: int = TURNS) -> str:
    history: list[tuple[str, str]] = []
    for _ in range(turns):
        history.append(("customer", str(customer(history))))
        history.append(("shop", str(shop(history))))
    return "\n".join(f"{who}: {line}" for who, line in history)


if __name__ == "__main__":
    from _common import run

    run(conversation, __doc__.splitlines()[0])
