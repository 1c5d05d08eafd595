"""Turn a tuner's choice (a layout and one option row per stage) into a TrainingPlan."""

from __future__ import annotations

from simulator.specs.plan import Offload, StagePlan, TrainingPlan
from tuner.training.intra_stage import StageTable
from tuner.training.space import Layout


def build_plan(layout: Layout, rows: list[tuple[StageTable, int]], global_batch_size: int,
               seq_length: int, flash_attention: bool = True, name: str = "simtune-tuned") -> TrainingPlan:
    stages = []
    for table, row in rows:
        opt = table.option(row)
        stages.append(StagePlan(
            layers=table.layers, checkpointed_layers=int(opt["k"]), zero_stage=int(opt["zero"]),
            offload=Offload(weights=opt["o_w"], gradients=opt["o_g"], optimizer=opt["o_o"], activations=opt["o_a"]),
        ))
    any_ckpt = any(st.checkpointed_layers for st in stages)
    zeros = [st.zero_stage for st in stages]
    # FSDP's schedules are plan-wide: only single-stage (sharded) layouts search them.
    kf, ku = (max(table.option(row).get(key, 0.0) for table, row in rows) for key in ("kf", "ku"))
    return TrainingPlan(
        name=name, tp=layout.tp, pp=layout.pp, dp=layout.dp, micro_batch_size=layout.micro_batch_size,
        global_batch_size=global_batch_size, seq_length=seq_length,
        schedule="interleaved" if layout.virtual_stages > 1 else "1f1b", virtual_stages=layout.virtual_stages,
        zero_stage=max(set(zeros), key=zeros.count), dp_shard=layout.dp_shard,
        reshard_after_forward=not kf, reshard_between_microbatches=not ku,
        sequence_parallel=layout.sequence_parallel,
        recompute="selective" if layout.selective else ("full" if any_ckpt else "none"),
        flash_attention=flash_attention, stages=stages,
    )
