"""Check a DeepSpeed config with DeepSpeed's own DeepSpeedConfig, as deepspeed.initialize
builds it, with a model-parallel unit giving the data-parallel size; print what it parsed.

Usage: python deepspeed_probe.py CONFIG_JSON DATA_PARALLEL_SIZE PIPELINE_STAGES

DeepSpeedConfig checks train_batch_size = micro-batch x accumulation x data-parallel size and
rejects unknown keys in zero_optimization and bf16. With PIPELINE_STAGES > 1 the pipeline
engine's own rule is applied too: runtime/pipe/engine.py asserts ZeRO stage < 2 (the probe
reads that assertion from DeepSpeed's source, so a release that drops it shows here).
"""

import inspect
import json
import os
import sys

from deepspeed import comm
from deepspeed.runtime.config import DeepSpeedConfig


class DataParallelUnit:
    """The part of Megatron-DeepSpeed's mpu that DeepSpeedConfig asks."""

    def __init__(self, size: int):
        self.size = size

    def get_data_parallel_world_size(self) -> int:
        return self.size


path, dp, pp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29511"),
                  RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
config = DeepSpeedConfig(path, mpu=DataParallelUnit(dp))
stage = config.zero_optimization_stage
pipe_rule = None
if pp > 1:
    from deepspeed.runtime.pipe import engine

    source = "".join(inspect.getsource(engine.PipelineEngine.__init__).split())
    pipe_rule = "zero_optimization_stage()<ZeroStageEnum.gradients" in source
    if pipe_rule and stage >= 2:
        raise SystemExit(f"DeepSpeed's pipeline engine refuses ZeRO stage {stage} with pipeline parallelism")
zero = config.zero_config
print(json.dumps({
    "train_batch_size": config.train_batch_size,
    "micro_batch": config.train_micro_batch_size_per_gpu,
    "accumulation": config.gradient_accumulation_steps,
    "zero_stage": stage, "bf16": config.bfloat16_config.enabled if hasattr(config, "bfloat16_config") else None,
    "offload_optimizer": zero.offload_optimizer.device if zero.offload_optimizer else None,
    "offload_param": zero.offload_param.device if zero.offload_param else None,
    "hpz": zero.zero_hpz_partition_size, "pipe_rule_found": pipe_rule,
}, default=str))
comm.destroy_process_group()
