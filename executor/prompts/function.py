"""`@ppl` prompt functions and `gen()`.

    @ppl
    def answer(question: str) -> str:
        "You are a concise assistant."          # the docstring: the system prompt
        f"Question: {question}"                 # expression statements add to the prompt
        NumberedList(["Think.", "Answer."])
        return gen(max_tokens=64)               # a future; the caller decides when to wait

`ppl` rewrites the function's syntax tree once, at decoration: each expression statement
(other than the docstring) becomes `__ppl_add__(value)`, which adds strings, formatted values,
messages and futures to the invocation's `PromptContext` (None, what a bare call for its effect
returns, is ignored). Names the function closes over are read when it is decorated.

Context modes: `ctx="new"` (the default) starts empty, `"copy"` starts from a copy of the
caller's context, `"same"` shares the caller's context (what it adds, the caller sees).
`gen()` sends the current context; its future is then added to the context as the assistant's
message, so the next `gen()` continues the conversation.
"""

from __future__ import annotations

import ast
import contextvars
import functools
import inspect
import textwrap
from collections.abc import Callable
from typing import Any

from executor.prompts.backends import CallRequest
from executor.prompts.context import Message, PromptContext
from executor.prompts.future import Gen
from executor.prompts.runtime import current_runtime
from executor.prompts.tools import Tool

CTX_MODES = ("new", "copy", "same")
_context: contextvars.ContextVar[PromptContext | None] = contextvars.ContextVar("simtune_prompt_context",
                                                                               default=None)


def _add(value: Any) -> None:
    ctx = _context.get()
    if ctx is not None:
        ctx.add(value)


class _AddExpressions(ast.NodeTransformer):
    """`expr` -> `__ppl_add__(expr)` for every expression statement of the function body
    (not of nested functions or classes)."""

    def __init__(self, root: ast.AST):
        self.root = root

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        if node is not self.root:
            return node
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            body = body[1:]  # the docstring stays a docstring
            node.body = node.body[:1] + [self.visit(s) for s in body]
        else:
            node.body = [self.visit(s) for s in body]
        node.decorator_list = []
        return node

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.AST:
        return node

    def visit_Lambda(self, node: ast.Lambda) -> ast.AST:
        return node

    def visit_Expr(self, node: ast.Expr) -> ast.AST:
        call = ast.Call(ast.Name("__ppl_add__", ast.Load()), [node.value], [])
        return ast.copy_location(ast.Expr(call), node)


def _rewrite(fn: Callable) -> Callable:
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError) as err:
        raise TypeError(f"@ppl needs the source of {fn.__qualname__} ({err})") from None
    tree = ast.parse(source)
    root = tree.body[0]
    if not isinstance(root, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise TypeError(f"@ppl decorates functions, not {type(root).__name__}")
    tree = ast.fix_missing_locations(_AddExpressions(root).visit(tree))
    ast.increment_lineno(tree, fn.__code__.co_firstlineno - 1)  # tracebacks point at the real lines
    namespace = dict(fn.__globals__)
    if fn.__closure__:
        namespace.update({name: cell.cell_contents for name, cell in zip(fn.__code__.co_freevars, fn.__closure__)})
    namespace["__ppl_add__"] = _add
    code = compile(tree, inspect.getsourcefile(fn) or "<ppl>", "exec")
    exec(code, namespace)  # noqa: S102 - the user's own function, rewritten
    new = namespace[root.name]
    new.__defaults__, new.__kwdefaults__ = fn.__defaults__, fn.__kwdefaults__
    return new


def ppl(fn: Callable | None = None, *, ctx: str = "new", name: str | None = None) -> Callable:
    """Make `fn` a prompt function (see the module docstring)."""
    if ctx not in CTX_MODES:
        raise ValueError(f"ctx = {ctx!r}: allowed {', '.join(CTX_MODES)}")

    def decorate(f: Callable) -> Callable:
        inner = _rewrite(f)
        system_prompt = inspect.getdoc(f)
        label = name or f.__name__

        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            caller = _context.get()
            if ctx == "same" and caller is not None:
                context = caller
            elif ctx == "copy" and caller is not None:
                context = caller.copy()
            else:
                context = PromptContext()
            if system_prompt and not (ctx == "same" and caller is not None):
                context.messages.insert(0, Message("system", [system_prompt]))
            runtime = current_runtime()
            frame, frame_token = runtime.enter(label)
            token = _context.set(context)
            try:
                return inner(*args, **kwargs)
            finally:
                _context.reset(token)
                runtime.leave(frame, frame_token)

        wrapper.__ppl__ = True  # type: ignore[attr-defined]
        return wrapper

    return decorate(fn) if fn is not None else decorate


def gen(prompt: Any = None, *, max_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
        stop: str | list[str] | None = None, seed: int | None = None, tools: list[Any] | None = None,
        model: str | None = None) -> Gen:
    """Issue an LLM call on the current prompt context (plus `prompt`, if given); returns a
    future at once. Outside a prompt function, `prompt` alone is the user message."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens = {max_tokens}: must be >= 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature = {temperature}, top_p = {top_p}: need temperature >= 0 and 0 < top_p <= 1")
    context = _context.get()
    if context is None:
        if prompt is None:
            raise ValueError("gen() outside a @ppl function needs a prompt")
        context = PromptContext()
    messages = [Message(m.role, list(m.parts)) for m in context.messages]
    if prompt is not None:
        extra = PromptContext(messages)
        extra.add(prompt)
        messages = extra.messages
    if not messages:
        raise ValueError("gen(): the prompt context is empty; add text before calling gen()")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    schemas = tuple(Tool.of(t).schema() for t in tools or ())
    request = CallRequest([], max_tokens, temperature, top_p, stops, seed, schemas, model)
    inputs = [f for m in messages for f in m.futures()]
    result = current_runtime().submit(messages, request, inputs)
    if _context.get() is not None:
        context.add(result)  # the answer becomes the assistant's message
    return result


def call_tool(tool: Any, **arguments: Any) -> Any:
    """Run a tool and trace the call and its result."""
    runtime = current_runtime()
    t = Tool.of(tool)
    start = runtime.now()
    try:
        value = t.fn(**arguments)
    except Exception as err:
        runtime.tool_record({"name": t.name, "arguments": arguments, "result": None,
                             "error": f"{type(err).__name__}: {err}", "start": start, "end": runtime.now()})
        raise
    runtime.tool_record({"name": t.name, "arguments": arguments, "result": value, "error": None,
                         "start": start, "end": runtime.now()})
    return value
