"""Chain-of-thought with self-consistency (Wang et al. 2023, arXiv 2203.11171): ten reasoning
branches sampled at once, the most common final answer wins.

    python examples/prompts/cot_sc.py [--max-concurrency 1] [--trace cot.jsonl]
"""

from __future__ import annotations

import re
from collections import Counter

from executor.prompts import gen, ppl

QUESTION = ("A baker makes 24 rolls in the morning and 18 in the afternoon. She sells 29. "
            "How many rolls are left?")
BRANCHES = 10


@ppl
def reason(question: str, seed: int):
    """You are a careful math tutor. Think step by step, then end with 'Answer: <number>'."""
    f"Question: {question}"
    return gen(max_tokens=96, temperature=0.7, top_p=0.95, seed=seed)


def final_number(text: str) -> str | None:
    found = re.findall(r"Answer:\s*(-?\d+)", text) or re.findall(r"-?\d+", text)
    return found[-1] if found else None


def self_consistency(question: str = QUESTION, branches: int = BRANCHES) -> str:
    chains = [reason(question, seed) for seed in range(branches)]  # all ten run at once
    votes = Counter(n for n in (final_number(str(c)) for c in chains) if n is not None)
    if not votes:
        return "no branch gave a number"
    answer, count = votes.most_common(1)[0]
    return f"{answer} ({count} of {branches} branches)"


if __name__ == "__main__":
    from _common import run

    run(self_consistency, __doc__.splitlines()[0])
