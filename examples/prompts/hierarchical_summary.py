"""Three-level hierarchical summarization (MemWalker-style, Chen et al. 2023, arXiv
2310.05029) of a bundled public-domain text, the U.S. Declaration of Independence (1776):
every chunk summarized at once, then every group of summaries, then one final summary.

    python examples/prompts/hierarchical_summary.py [--max-concurrency 1]
"""

from __future__ import annotations

from pathlib import Path

from executor.prompts import NumberedList, Tagged, gen, ppl

TEXT = Path(__file__).parent / "data" / "declaration_of_independence.txt"
CHUNK_CHARS = 600
GROUP = 4


@ppl
def summarize_chunk(chunk: str):
    """Summarize the passage in one sentence."""
    Tagged("passage", chunk)
    return gen(max_tokens=48)


@ppl
def summarize_summaries(summaries: list):
    """Combine these summaries of consecutive passages into one or two sentences."""
    NumberedList(summaries)  # futures: this call starts when all of them are done
    return gen(max_tokens=64)


def chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Paragraph-aligned chunks of about `size` characters."""
    out, current = [], ""
    for paragraph in (p.strip() for p in text.split("\n\n") if p.strip()):
        if current and len(current) + len(paragraph) > size:
            out.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}".strip()
    return out + ([current] if current else [])


def hierarchical_summary(path: Path = TEXT) -> str:
    level1 = [summarize_chunk(c) for c in chunks(path.read_text(encoding="utf-8"))]
    level2 = [summarize_summaries(level1[i:i + GROUP]) for i in range(0, len(level1), GROUP)]
    return str(summarize_summaries(level2))


if __name__ == "__main__":
    from _common import run

    run(hierarchical_summary, __doc__.splitlines()[0])
