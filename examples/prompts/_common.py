"""What every example shares: its command line (backend, concurrency, trace) and a timer."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from executor.prompts import Runtime, backend_from_env


def run(program: Callable[[], Any], description: str) -> Any:
    """Run `program` under a Runtime set by the command line; print its answer and wall time."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="calls in flight at once (1: sequential); default: the backend's")
    parser.add_argument("--trace", default=None, help="write the JSONL trace here")
    args = parser.parse_args()
    backend = backend_from_env()  # SIMTUNE_LLM_BACKEND: local (default), openai, simulated
    t0 = time.perf_counter()
    with Runtime(backend, trace=args.trace, max_concurrency=args.max_concurrency) as rt:
        answer = program()
        text = str(answer)
    seconds = time.perf_counter() - t0
    print(text)
    print(f"-- {len(rt.calls)} calls on {backend.name}, {seconds:.2f} s wall, "
          f"at most {rt.peak_in_flight} in flight")
    return answer
