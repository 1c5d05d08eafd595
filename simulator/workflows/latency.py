"""The latency of one LLM call on a serving deployment, at a given batch size.

prefill(prompt) + output tokens x one decode step of `batch` sequences, each at the call's
mean context (prompt + half the output): the iteration model of `simulator.serving`, on the
deployment's decode layout. The simulated prompt backend sleeps this long.
"""

from __future__ import annotations

from functools import lru_cache

from simulator.serving.iteration import IterationModel, Work
from simulator.specs.catalog import load_cluster, load_deployment, load_model
from simulator.specs.serving import DeploymentSpec


def serving_models(model: str, cluster: str, deployment: str) -> tuple[IterationModel, IterationModel, DeploymentSpec]:
    """The prefill and decode iteration models of a deployment, and the deployment."""
    m, c, dep = load_model(model), load_cluster(cluster), load_deployment(deployment)
    return (IterationModel(m, c, dep.prefill, dep.engine),
            IterationModel(m, c, dep.decode or dep.prefill, dep.engine), dep)


class CallLatency:
    def __init__(self, model: str, cluster: str, deployment: str):
        self.prefill, self.decode, _ = serving_models(model, cluster, deployment)
        self._cached = lru_cache(maxsize=4096)(self._seconds)

    def seconds(self, prompt_tokens: int, output_tokens: int, batch: int = 1) -> float:
        if prompt_tokens < 1 or output_tokens < 1 or batch < 1:
            raise ValueError(f"prompt_tokens={prompt_tokens}, output_tokens={output_tokens}, batch={batch}: "
                             "all must be >= 1")
        return self._cached(prompt_tokens, output_tokens, batch)

    def _seconds(self, prompt_tokens: int, output_tokens: int, batch: int) -> float:
        context = prompt_tokens + output_tokens // 2
        step = self.decode.step_s([Work(1, context, 1)] * batch)
        return self.prefill.prefill_s(prompt_tokens) + output_tokens * step
