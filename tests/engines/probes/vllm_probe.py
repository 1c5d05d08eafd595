"""Parse `vllm serve` arguments with vLLM's own argument parser (the CPU build's module
layout) and print what it parsed as JSON. Unknown flags are errors.

Usage: python vllm_probe.py MODEL ARG...
"""

import json
import sys

from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser

parser = make_arg_parser(FlexibleArgumentParser())
args = parser.parse_args(["--model", sys.argv[1], *sys.argv[2:]])
keys = ("model", "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size",
        "max_num_seqs", "max_num_batched_tokens", "enable_chunked_prefill", "speculative_config",
        "swap_space", "gpu_memory_utilization", "max_model_len", "dtype", "enforce_eager",
        "kv_cache_dtype", "block_size", "enable_prefix_caching")
print(json.dumps({k: getattr(args, k, None) for k in keys}, default=str))
