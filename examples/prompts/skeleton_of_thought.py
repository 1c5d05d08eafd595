"""Skeleton-of-thought (Ning et al. 2024, arXiv 2307.15337): ask for a short outline, then
expand every point at once, then join them.

    python examples/prompts/skeleton_of_thought.py [--max-concurrency 1]
"""

from __future__ import annotations

import re

from executor.prompts import Tagged, gen, ppl

TOPIC = "How to keep a sourdough starter healthy"
MAX_POINTS = 5


@ppl
def skeleton(topic: str):
    """You are a helpful assistant."""
    f"List 4 key points for: {topic}. Write each point on its own line as a short phrase, numbered 1 to 4."
    return gen(max_tokens=64)


@ppl
def expand(topic: str, outline: str, point: str):
    """You expand one point of an outline into two or three sentences."""
    Tagged("question", topic)
    Tagged("outline", outline)
    f"Expand only this point: {point}"
    return gen(max_tokens=80)


def points_of(outline: str) -> list[str]:
    found = [m.strip().strip("*").strip() for m in re.findall(r"^\s*\d+[.)]\s*(.+)$", outline, flags=re.M)]
    return found[:MAX_POINTS] or [line.strip() for line in outline.splitlines() if line.strip()][:MAX_POINTS]


def skeleton_of_thought(topic: str = TOPIC) -> str:
    outline = str(skeleton(topic))                       # the one sequential step
    points = points_of(outline) or [topic]
    bodies = [expand(topic, outline, p) for p in points]  # all points at once
    return "\n\n".join(f"{i}. {p}\n{b}" for i, (p, b) in enumerate(zip(points, bodies), 1))


if __name__ == "__main__":
    from _common import run

    run(skeleton_of_thought, __doc__.splitlines()[0])
