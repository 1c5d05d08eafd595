"""Instruction prompts for the speculative decoding measurement, built from text on this machine.

Nothing is downloaded and nothing is copied from copyrighted sources: the code prompts quote
the source or docstring of pure-Python standard-library functions (`inspect.getsource`), and
the open questions below were written for this project. Tasks are mixed on purpose: some
outputs copy the prompt (add comments, add type hints: prompt lookup accepts most drafts),
some paraphrase it (explain, summarize a docstring, write a test: partial copying), and the
open questions copy nothing, so n-gram drafting sees a realistic range of acceptance rather
than the best or the worst case.

The order is fixed: every fourth prompt is an open question, code tasks rotate over
`CODE_TASKS`, functions follow `FUNCTIONS`. So the first b prompts of a run are a similar mix
for every b. (The functions' source text is that of the running Python, so prompts differ
slightly between Python versions.)
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

FUNCTIONS = (
    "textwrap.indent", "statistics.median", "html.escape", "shlex.quote", "colorsys.rgb_to_hls",
    "string.capwords", "statistics.mode", "fnmatch.fnmatch", "base64.b64encode", "calendar.leapdays",
    "statistics.fmean", "copy.copy", "textwrap.shorten", "html.unescape", "statistics.multimode",
    "glob.escape", "colorsys.hsv_to_rgb", "statistics.geometric_mean", "shutil.copyfileobj",
    "dataclasses.asdict", "secrets.token_hex", "statistics.stdev", "fnmatch.filter",
    "contextlib.suppress", "mimetypes.guess_type", "random.Random.shuffle", "ipaddress.ip_address",
    "statistics.median_low", "zipfile.is_zipfile", "enum.unique", "base64.b64decode",
    "linecache.getline", "colorsys.rgb_to_hsv", "email.utils.parseaddr", "tokenize.untokenize",
    "secrets.token_urlsafe", "functools.total_ordering", "uuid.uuid5", "string.Template.substitute",
    "pprint.pformat", "colorsys.hls_to_rgb", "calendar.isleap", "shlex.join", "random.Random.choice",
    "glob.has_magic", "textwrap.fill", "statistics.mean", "json.JSONEncoder.default",
    "calendar.weekday", "getpass.getuser", "glob.glob", "inspect.cleandoc", "textwrap.wrap",
    "statistics.pstdev", "calendar.monthrange", "inspect.getdoc", "webbrowser.open",
    "email.utils.formataddr", "colorsys.rgb_to_yiq",
)

# (kind, instruction, what it quotes): "source" quotes the code, "doc" the docstring only
CODE_TASKS = (
    ("comment", "Add short comments to this Python function. Return the whole function.", "source"),
    ("explain", "Explain what this Python function does, in one short paragraph.", "source"),
    ("type-hints", "Rewrite this Python function with type hints. Return the whole function.", "source"),
    ("summarize", "Summarize this docstring in one or two sentences.", "doc"),
    ("test", "Write a pytest unit test for this Python function.", "source"),
)

QUESTIONS = (
    "Why do computers store numbers in binary?",
    "Give three tips for writing readable Python code.",
    "What is the difference between a list and a tuple in Python?",
    "Explain what a hash table is to a beginner.",
    "How does a bicycle stay upright while moving?",
    "Write a short poem about the first snow of winter.",
    "What are the pros and cons of working from home?",
    "Describe how to make a cup of tea, step by step.",
    "Why is the sea salty?",
    "What is recursion? Give a small example.",
    "Suggest a name for a cafe that also sells books, and explain the choice.",
    "How do vaccines help the body fight disease?",
    "What should I pack for a three-day hiking trip?",
    "Explain the difference between weather and climate.",
    "Why do leaves change color in autumn?",
    "What is a good way to learn a new language as an adult?",
)


@dataclass(frozen=True)
class Prompt:
    kind: str            # a CODE_TASKS kind, or "question"
    subject: str         # the function's dotted name, or "" for questions
    text: str            # the user message
    ids: tuple[int, ...]  # chat-templated token ids, ending with the assistant turn's opening


def _resolve(dotted: str):
    """An object from a dotted name whose module part may itself be dotted (email.utils.x)."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def _quote(dotted: str, what: str) -> str | None:
    """The function's source (or docstring), or None when this Python cannot give it (frozen
    or C-implemented functions)."""
    try:
        obj = _resolve(dotted)
        text = inspect.getsource(obj) if what == "source" else inspect.getdoc(obj)
    except (ImportError, AttributeError, OSError, TypeError):
        return None
    return (text.strip() or None) if text else None


def chat_ids(tokenizer, text: str) -> list[int]:
    """The token ids of one user turn under the tokenizer's chat template, assistant turn open."""
    out = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    ids = out["input_ids"] if not isinstance(out, list) else out
    return [int(t) for t in ids]


def build_prompts(tokenizer, n: int = 64, max_prompt_tokens: int = 400) -> list[Prompt]:
    """The first n prompts of the fixed order (see the module docstring), each at most
    max_prompt_tokens tokens (longer ones are skipped)."""
    if n < 1:
        raise ValueError(f"n={n}: need at least 1 prompt")
    out: list[Prompt] = []
    questions = iter(QUESTIONS)
    functions = iter(FUNCTIONS)
    task_i, skipped = 0, 0
    while len(out) < n:
        if skipped > len(FUNCTIONS):
            raise RuntimeError("no usable standard-library function source (all frozen, C or too long?)")
        if len(out) % 4 == 3:
            q = next(questions, None)
            if q is None:
                questions = iter(QUESTIONS)  # wrap around: more than 4 x 16 prompts asked for
                q = next(questions)
            out.append(Prompt("question", "", q, tuple(chat_ids(tokenizer, q))))
            continue
        name = next(functions, None)
        if name is None:
            functions = iter(FUNCTIONS)
            name = next(functions)
        kind, instruction, what = CODE_TASKS[task_i % len(CODE_TASKS)]
        quoted = _quote(name, what)
        if quoted is None and what == "doc":  # no docstring: fall back to the next task
            kind, instruction, what = CODE_TASKS[(task_i + 1) % len(CODE_TASKS)]
            quoted = _quote(name, what)
        if quoted is None:
            skipped += 1
            continue
        fence = "```python\n" if what == "source" else "```\n"
        text = f"{instruction}\n\n{fence}{quoted}\n```"
        ids = chat_ids(tokenizer, text)
        if len(ids) > max_prompt_tokens:
            skipped += 1
            continue
        task_i, skipped = task_i + 1, 0
        out.append(Prompt(kind, name, text, tuple(ids)))
    return out
