"""vLLM: `vllm_serve.sh`, one `vllm serve` command running a deployment's static layout.

vLLM expresses tensor and pipeline parallelism, data-parallel replicas (V1 engine, 0.8 and
later), the batch limits, the KV block size, the memory fraction and Sarathi-style chunked
prefill directly. What it cannot express is recorded: re-sharding between prefill and decode
and the Seesaw scheduler, a CPU KV buffer, swap preemption (the V1 engine only recomputes),
block sizes its kernels do not offer, and a batch token limit below the context length
without chunked prefill.
"""

from __future__ import annotations

import json
from pathlib import Path

from executor.launch.base import Approximations, LaunchFile
from executor.launch.serving import Flag, flag, gib, nodes_used, serving_script, static_layout
from simulator.specs.hardware import ClusterSpec
from simulator.specs.model import TransformerSpec
from simulator.specs.serving import DeploymentSpec, Parallel

ENGINE = "vllm"
FILE = "vllm_serve.sh"
BLOCK_SIZES = (1, 8, 16, 32, 64, 128)  # --block-size choices on CUDA
CONTEXT = 512  # context tokens per sequence at which an adaptive policy's k*(b) is computed


def write(
    model: TransformerSpec,
    cluster: ClusterSpec,
    deployment: DeploymentSpec,
    model_path: str | None = None,
) -> list[LaunchFile]:
    approx = Approximations("vLLM")
    layout = static_layout(deployment, approx)
    args = [
        *_parallel_args(cluster, deployment, layout),
        *_scheduler_args(model, deployment, approx),
        *_memory_args(deployment, layout, approx),
        *_speculation_args(model, cluster, deployment, approx),
    ]
    notes = []
    nodes = nodes_used(cluster, deployment)
    if nodes > 1:
        notes.append(
            f"The deployment spans {nodes} nodes: start a Ray cluster over them first "
            "(`ray start --head` on this node, `ray start --address=HEAD:6379` on the others) "
            "and run this script on the head node only."
        )
    text = serving_script(
        "vLLM (vllm serve)", model, cluster, deployment, approx,
        'vllm serve "$MODEL"', args, model_path, notes,
    )
    return [LaunchFile(ENGINE, Path(FILE), text, list(approx), executable=True)]


def _parallel_args(cluster: ClusterSpec, deployment: DeploymentSpec, layout: Parallel) -> list[Flag]:
    dp = deployment.dp
    args = [flag("--tensor-parallel-size", layout.tp), flag("--pipeline-parallel-size", layout.pp)]
    if dp > 1:
        args.append(flag(
            "--data-parallel-size", dp,
            note=f"Needs vLLM >= 0.8 (V1 engine): {dp} replicas behind this one server. With an "
                 f"older vLLM, start {dp} servers on disjoint CUDA_VISIBLE_DEVICES behind a "
                 "load balancer instead.",
        ))
    if layout.devices > cluster.devices_per_node:
        args.append(flag("--distributed-executor-backend", "ray",
                         note="A replica spans nodes: its ranks are placed through Ray."))
    if dp > 1 and nodes_used(cluster, deployment) > 1:
        args.append(flag("--data-parallel-backend", "ray",
                         note="Replicas on several nodes are placed through Ray (vLLM >= 0.10)."))
    return args


def _scheduler_args(
    model: TransformerSpec, deployment: DeploymentSpec, approx: Approximations
) -> list[Flag]:
    """Batch limits and chunking: Sarathi chunks prefills, the vllm and seesaw schedulers do not."""
    n, m, c = deployment.max_num_seqs, deployment.max_batched_tokens, deployment.chunk_size
    args = [flag("--max-num-seqs", n)]
    if deployment.scheduler == "sarathi":
        note = (f"Sarathi's chunk of {c} tokens is vLLM's per-step token budget; vLLM counts the "
                "step's decode tokens in it, so a step prefills up to that budget minus its decodes.")
        if m != c:
            note += f" The deployment's max_batched_tokens ({m}) is not written."
        return [*args, flag("--enable-chunked-prefill"),
                flag("--max-num-batched-tokens", c, note=note)]
    if deployment.scheduler == "seesaw":
        approx.add("vLLM has no Seesaw scheduler: wrote its nearest, whole-prompt prefill "
                   "without chunking (--no-enable-chunked-prefill)")
    args += [
        flag("--no-enable-chunked-prefill",
             note="Whole prompts are prefilled, as the simulated scheduler does (vLLM's V1 engine "
                  "chunks by default; older releases spell this --enable-chunked-prefill False)."),
        flag("--max-num-batched-tokens", m),
    ]
    if m < model.seq_length:  # vLLM refuses to start otherwise
        args.append(flag("--max-model-len", m))
        approx.add(
            f"vLLM without chunked prefill needs --max-num-batched-tokens >= the context length: "
            f"wrote --max-model-len {m}, below the model's {model.seq_length} tokens, so longer "
            "prompts are rejected"
        )
    return args


def _speculation_args(
    model: TransformerSpec, cluster: ClusterSpec, deployment: DeploymentSpec, approx: Approximations
) -> list[Flag]:
    """`--speculative-config`: vLLM drafts one k for every batch, optionally switched off above
    a batch size, so an adaptive or goodput policy is written as k*(1) with speculation
    disabled from the first batch size whose k* is 0."""
    spec = deployment.speculation
    if spec is None:
        return []
    from simulator.speculation import NGRAM, ModelStepCost, max_batch_in_kv, policy_table

    config: dict = {"method": "ngram", "prompt_lookup_max": 4, "prompt_lookup_min": 1} if spec.draft == NGRAM \
        else {"method": "draft_model", "model": spec.draft, "draft_tensor_parallel_size": spec.draft_tp}
    note = None
    if spec.policy == "fixed":
        config["num_speculative_tokens"] = spec.k
    else:
        cost = ModelStepCost.build(model, cluster, deployment.decode, spec, deployment.engine)
        limit = min(deployment.max_num_seqs, max(1, max_batch_in_kv(model, cluster, deployment, CONTEXT)))
        sizes = sorted({b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if b < limit} | {limit})
        table = policy_table(cost, spec.acceptance, sizes, spec.k_max, CONTEXT)
        config["num_speculative_tokens"] = max(table.rows[0].k, 1)
        off = next((r.batch_size for r in table.rows if r.k == 0), None)
        if off is not None:
            config["disable_by_batch_size"] = off
        ks = ", ".join(f"{b}: {k}" for b, k in table.as_dict().items())
        note = f"Predicted k*(batch size) at {CONTEXT} context tokens: {{{ks}}}."
        approx.add(f"vLLM drafts one k for every batch size: the {spec.policy} policy is written as "
                   f"k = {config['num_speculative_tokens']}"
                   + (f", switched off from {off} running requests" if off else "") + f" ({note})")
    if spec.draft != NGRAM:
        note = ((note + " ") if note else "") + (
            f"Replace the draft '{spec.draft}' (a simtune catalog name) by its checkpoint path or "
            "Hugging Face id; it must share the target's tokenizer.")
    return [flag("--speculative-config", json.dumps(config, separators=(",", ":")), note=note)]


def _memory_args(
    deployment: DeploymentSpec, layout: Parallel, approx: Approximations
) -> list[Flag]:
    block = deployment.block_size
    if block not in BLOCK_SIZES:
        block = min(BLOCK_SIZES, key=lambda b: (abs(b - deployment.block_size), b))
        approx.add(f"vLLM offers KV blocks of {', '.join(map(str, BLOCK_SIZES))} tokens: "
                   f"block_size {deployment.block_size} written as --block-size {block}")
    args = [
        flag("--block-size", block),
        flag("--gpu-memory-utilization", f"{deployment.gpu_memory_utilization:g}"),
        flag("--dtype", "float16",
             note="float16 weights and KV cache: 2 bytes per value, as simulated (bfloat16 takes "
                  "the same memory; use it for checkpoints trained in bfloat16)."),
        flag("--enable-prefix-caching", note="Automatic prefix caching, as simulated (prefix_caching).")
        if deployment.prefix_caching else
        flag("--no-enable-prefix-caching", note="No prefix caching, as simulated (vLLM's V1 engine caches "
                                                "prefixes by default; set prefix_caching to simulate it)."),
    ]
    buffer_GB = deployment.cpu_kv_buffer_GB
    if deployment.preemption == "swap":
        # the deployment spec requires a CPU buffer for swap preemption
        swap_GiB = gib(buffer_GB) / layout.devices
        where = f"the CPU KV buffer, {buffer_GB:g} GB per replica, over its {layout.devices} GPU(s)"
        args.append(flag("--swap-space", f"{swap_GiB:.4g}",
                         note=f"CPU swap space per GPU in GiB: {where}."))
        approx.add(
            "vLLM's V1 engine preempts only by recomputation (--preemption-mode went with the V0 "
            f"engine): swap preemption is not selectable; --swap-space {swap_GiB:.4g} GiB per GPU "
            "is written for the versions that still swap"
        )
    elif buffer_GB:
        approx.add(f"vLLM has no CPU KV buffer to park requests in: cpu_kv_buffer_GB "
                   f"{buffer_GB:g} not written (the KV cache lives on the GPUs only)")
    return args
