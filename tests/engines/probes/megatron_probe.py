"""Parse and validate pretrain_gpt.py arguments with Megatron-LM's own parse_args and
validate_args (megatron-core ships megatron/training/arguments.py); print what they give.

Usage: python megatron_probe.py WORLD_SIZE GPU_ARCH ARG...
GPU_ARCH is the target's compute-capability major (8 for A100, 9 for H100): validation asks
the GPU, which this machine lacks. Transformer Engine is absent here; validation's checks of
its version see none. Unknown arguments are errors (ignore_unknown_args=False).
"""

import json
import os
import sys
import typing

import typing_extensions

if not hasattr(typing, "override"):  # megatron-core targets Python >= 3.12
    typing.override = typing_extensions.override

world, arch, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
os.environ.update(WORLD_SIZE=str(world), RANK="0", LOCAL_RANK="0")

from megatron.training import arguments  # noqa: E402

arguments.get_device_arch_version = lambda: arch
sys.argv = ["pretrain_gpt.py", *argv]
args = arguments.parse_args(ignore_unknown_args=False)
args.world_size, args.rank = world, 0
arguments.validate_args(args, {})
keys = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "data_parallel_size",
        "virtual_pipeline_model_parallel_size", "micro_batch_size", "global_batch_size",
        "sequence_parallel", "recompute_granularity", "recompute_method", "recompute_num_layers",
        "group_query_attention", "use_distributed_optimizer", "use_megatron_fsdp", "grad_reduce_in_bf16",
        "accumulate_allreduce_grads_in_fp32", "bf16", "fp8", "num_layers", "hidden_size",
        "num_attention_heads", "num_query_groups", "ffn_hidden_size", "padded_vocab_size",
        "vocab_size", "rotary_base", "use_rope_scaling", "rope_scaling_factor", "normalization",
        "swiglu", "seq_length", "optimizer_cpu_offload", "optimizer_offload_fraction",
        "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
        "num_distributed_optimizer_instances", "untie_embeddings_and_output_weights")
print(json.dumps({k: getattr(args, k, None) for k in keys}, default=str))
