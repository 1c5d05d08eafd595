"""`simtune serve`: the OpenAI-compatible server over the real serving engine (SmolLM2-135M).

Not `simulate serve` (which predicts a deployment): this one runs the model and answers HTTP.
This process answers HTTP; the engine steps in a process of its own (`--engine-process`, the
default, as vLLM's engine core; `--in-process`: a thread of this one). A deployment spec
selects the scheduler, its limits and the layout: `prefill: {tp, pp}` starts tp x pp ranks
(the engine's process is rank 0: scheduler and sampler; the others are workers).
A re-sharding deployment (`scheduler: seesaw`, a `decode: {tp, pp}` on as many ranks, a
`cpu_kv_buffer_GB`) prefills in the prefill layout and decodes in the decode layout, moving
the KV through the CPU buffer (executor/serving/reshard.py). `dp: N` > 1 runs N replicas of
that layout, each in its own process with its own KV pool (`--num-blocks` each), behind the
simulator's router (executor/serving/replicas.py). A deployment's `speculation` (draft 'ngram'; policy fixed, adaptive or goodput) turns on
speculative decoding, on one rank with the vllm scheduler; other combinations are refused
with a SpecError naming the field.
"""

from __future__ import annotations

from typing import Annotated

import typer

from simtune.cli.render import err, handles_errors
from simulator.errors import SpecError
from simulator.specs.catalog import load_deployment


@handles_errors
def serve(
    model: Annotated[str, typer.Option("--model", "-m", help="Model to serve: smollm2-135m.")] = "smollm2-135m",
    deployment: Annotated[str | None, typer.Option(
        "--deployment", "-d", help="Deployment (catalog name or YAML): scheduler, limits, KV block size. "
        "prefill {tp, pp} selects tensor/pipeline parallel ranks (gloo on CPU, NCCL on GPU); "
        "scheduler: seesaw with a decode {tp, pp} re-shards between prefill and decode; "
        "speculation (draft: ngram) turns on speculative decoding on one rank; "
        "dp: N runs N replicas behind a router.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_num_seqs: Annotated[int | None, typer.Option(help="Most sequences per step (default: the "
                                                          "deployment's, else 64).")] = None,
    scheduler: Annotated[str | None, typer.Option(help="vllm (prefill priority) or sarathi (chunked "
                                                       "prefill); default: the deployment's, else vllm.")] = None,
    dtype: Annotated[str, typer.Option(help="bfloat16 or float32.")] = "bfloat16",
    num_blocks: Annotated[int, typer.Option(help="KV cache blocks in the pool.")] = 2048,
    max_model_len: Annotated[int, typer.Option(help="Longest prompt + output, in tokens.")] = 2048,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait; more get 429.")] = 256,
    engine_process: Annotated[bool, typer.Option(
        "--engine-process/--in-process", help="Step the engine in a process of its own (default), or in a "
        "thread of the HTTP server's process.")] = True,
) -> None:
    """Serve SmolLM2-135M with an OpenAI-compatible API (/v1/completions, /v1/chat/completions,
    /v1/models, /health, /metrics)."""
    from executor.serving.engine import EngineConfig
    from executor.serving.server import SERVED_MODEL, serve_forever

    if model != SERVED_MODEL:
        raise SpecError("model", model, f"the serving engine runs {SERVED_MODEL!r} only")
    if scheduler is not None and scheduler not in ("vllm", "sarathi"):
        raise SpecError("scheduler", scheduler, "one of 'vllm', 'sarathi'")
    dep = load_deployment(deployment) if deployment else None
    overrides = {k: v for k, v in (("scheduler", scheduler), ("max_num_seqs", max_num_seqs)) if v is not None}
    overrides |= {"num_blocks": num_blocks, "max_model_len": max_model_len}
    config = (EngineConfig.from_deployment(dep, **overrides) if dep is not None
              else EngineConfig(**{"max_num_seqs": 64, **overrides}))
    layout = f"tp{config.tp} pp{config.pp}"
    if config.scheduler == "seesaw":
        layout = f"prefill {layout} -> decode tp{config.decode_tp or config.tp} pp{config.decode_pp or config.pp}"
    if config.dp > 1:
        layout = f"dp{config.dp} x {layout}"
    layout += ", engine in its own process" if engine_process or config.dp > 1 else ", engine in this process"
    err.print(f"serving {model} on http://{host}:{port}/v1 ({layout}, {config.scheduler}, "
              f"up to {config.max_num_seqs} "
              f"sequences, {config.num_blocks} KV blocks of {config.block_size}, {dtype})")
    serve_forever(config, host, port, dtype, model, max_queue, engine_process=engine_process)
