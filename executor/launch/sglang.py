"""SGLang: `sglang_serve.sh`, one `python -m sglang.launch_server` running a deployment's static layout.

SGLang expresses tensor parallelism, data-parallel replicas (its DP controller), pipeline
parallelism (recent releases), the batch limits, the KV page size, the memory fraction and
chunked prefill mixed with decodes (Sarathi's stall-free batches). What it cannot express is
recorded: re-sharding between prefill and decode and the Seesaw scheduler, swap preemption (it
retracts requests and recomputes them) and a CPU KV buffer.
"""

from __future__ import annotations

from pathlib import Path

from executor.launch.base import Approximations, LaunchFile
from executor.launch.serving import Flag, flag, nodes_used, serving_script, static_layout
from simulator.specs.hardware import ClusterSpec
from simulator.specs.model import TransformerSpec
from simulator.specs.serving import DeploymentSpec, Parallel

ENGINE = "sglang"
FILE = "sglang_serve.sh"


def write(
    model: TransformerSpec,
    cluster: ClusterSpec,
    deployment: DeploymentSpec,
    model_path: str | None = None,
) -> list[LaunchFile]:
    approx = Approximations("SGLang")
    layout = static_layout(deployment, approx)
    nodes = nodes_used(cluster, deployment)
    args = [
        *_parallel_args(deployment, layout, nodes),
        *_scheduler_args(deployment, approx),
        *_memory_args(deployment, approx),
    ]
    if deployment.speculation is not None:
        approx.add(f"speculative decoding ({deployment.speculation.policy} policy, draft "
                   f"{deployment.speculation.draft}) is not written: use the vLLM script, or SGLang's "
                   "--speculative-* flags by hand")
    notes, env = [], []
    if nodes > 1:
        notes.append(f"The deployment spans {nodes} nodes: run this script on every node with "
                     f"NODE_RANK 0..{nodes - 1} and MASTER_ADDR set to node 0's address.")
        env = [': "${NODE_RANK:=0}"', ': "${MASTER_ADDR:=localhost}"', ': "${MASTER_PORT:=29500}"']
    text = serving_script(
        "SGLang (sglang.launch_server)", model, cluster, deployment, approx,
        'python -m sglang.launch_server --model-path "$MODEL"', args, model_path, notes, env,
    )
    return [LaunchFile(ENGINE, Path(FILE), text, list(approx), executable=True)]


def _parallel_args(deployment: DeploymentSpec, layout: Parallel, nodes: int) -> list[Flag]:
    dp = deployment.dp
    args = [flag("--tp-size", layout.tp)]
    if layout.pp > 1:
        args.append(flag("--pp-size", layout.pp,
                         note="Pipeline parallelism needs SGLang >= 0.4.7 (added in mid-2025)."))
    args.append(flag(
        "--dp-size", dp,
        note=(f"SGLang's data-parallel controller runs {dp} replicas of {layout.devices} GPU(s) "
              "behind this server.") if dp > 1 else None,
    ))
    if nodes > 1:
        args += [flag("--nnodes", nodes),
                 flag("--node-rank", '"$NODE_RANK"', raw=True),
                 flag("--dist-init-addr", '"$MASTER_ADDR:$MASTER_PORT"', raw=True)]
    return args


def _scheduler_args(deployment: DeploymentSpec, approx: Approximations) -> list[Flag]:
    """Batch limits and chunking: Sarathi chunks prefills, the vllm and seesaw schedulers do not."""
    args = [flag("--max-running-requests", deployment.max_num_seqs)]
    if deployment.scheduler == "sarathi":
        args += [
            flag("--chunked-prefill-size", deployment.chunk_size,
                 note="Sarathi's chunk: prefill tokens per step."),
            flag("--enable-mixed-chunk",
                 note="Running decodes join each chunk's step, as in Sarathi's stall-free batches "
                      "(without it SGLang alternates prefill and decode steps)."),
        ]
    else:
        if deployment.scheduler == "seesaw":
            approx.add("SGLang has no Seesaw scheduler: wrote its nearest, whole-prompt prefill "
                       "without chunking (--chunked-prefill-size -1)")
        args.append(flag("--chunked-prefill-size", -1,
                         note="-1 turns chunked prefill off: whole prompts are prefilled, as the "
                              "simulated scheduler does (SGLang chunks by default)."))
    args.append(flag("--max-prefill-tokens", deployment.max_batched_tokens,
                     note="Prefill tokens per step: the deployment's max_batched_tokens."))
    return args


def _memory_args(deployment: DeploymentSpec, approx: Approximations) -> list[Flag]:
    args = [
        flag("--mem-fraction-static", f"{deployment.gpu_memory_utilization:g}",
             note="gpu_memory_utilization. SGLang's fraction holds the weights and the KV pool and "
                  "leaves activations to the rest, whereas vLLM's includes them: the KV pool comes "
                  "out somewhat larger than simulated."),
        flag("--page-size", deployment.block_size, note="Tokens per KV page: block_size."),
        flag("--dtype", "float16",
             note="float16 weights and KV cache: 2 bytes per value, as simulated (bfloat16 takes "
                  "the same memory; use it for checkpoints trained in bfloat16)."),
    ]
    if not deployment.prefix_caching:
        args.append(flag("--disable-radix-cache", note="No prefix caching, as simulated (SGLang's radix "
                                                       "cache shares prefixes by default; set prefix_caching "
                                                       "to simulate it)."))
    if deployment.preemption == "swap":
        approx.add("SGLang has no swap preemption: it retracts requests when the KV pool runs out "
                   "and recomputes them later (preemption recompute)")
    if deployment.cpu_kv_buffer_GB:
        approx.add(
            f"SGLang has no CPU KV buffer to park requests in: cpu_kv_buffer_GB "
            f"{deployment.cpu_kv_buffer_GB:g} not written (its hierarchical cache keeps copies of "
            "cached prefixes in host memory, a different mechanism)"
        )
    return args
