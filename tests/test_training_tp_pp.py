"""Tensor- and pipeline-parallel training steps equal one process's (real gloo ranks on the CPU).

Each case runs one forward and backward of a tiny catalog model on 2 or 4 ranks and compares
the loss and every parameter's gradient (gathered whole) with a single-process `Decoder`
holding the same weights (`init_weights`) on the same batch. Dropout is off (eval mode):
the ranks would draw other masks than the reference.
"""

from __future__ import annotations

import pytest
import torch

from executor.training.model import Decoder
from executor.training.pipeline import (
    StageModule,
    build_pipeline,
    chunk_layers,
    cross_entropy,
    init_weights,
    stage_layer_ids,
)
from executor.training.tensor_parallel import apply_tensor_parallel, reduce_partial_grads
from profiler.ranks import run_ranks
from simulator.specs.catalog import load_cluster, load_model
from simulator.specs.plan import TrainingPlan
from simulator.training.costs import TrainingCostModel

SEED = 0
BATCH = {"micro_batch_size": 1, "global_batch_size": 4}  # 4 micro-batches of 1 sequence


def setup(name: str, layers: int | None, plan_fields: dict):
    """The model (with `layers` layers if given), the plan and one batch of tokens and targets."""
    spec = load_model(name)
    if layers:
        spec = spec.model_copy(update={"num_layers": layers})
    plan = TrainingPlan(**BATCH, **plan_fields)
    text = torch.randint(0, spec.vocab_size, (plan.global_batch_size // plan.dp, spec.seq_length + 1),
                         generator=torch.Generator().manual_seed(1))
    return spec, plan, text[:, :-1], text[:, 1:]


def rank_step(rank: int, world_size: int, name: str, layers: int | None, plan_fields: dict):
    """One rank: (loss or None, {parameter name: whole gradient as a numpy array})."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    spec, plan, tokens, targets = setup(name, layers, plan_fields)
    mesh = init_device_mesh("cpu", (plan.pp, plan.tp), mesh_dim_names=("pp", "tp"))
    if plan.pp > 1:
        runner = build_pipeline(spec, plan, mesh["pp"], mesh["pp"].get_local_rank(), "cpu", seed=SEED)
        modules = runner.modules
    else:
        modules = [Decoder(spec)]
        init_weights(modules[0], SEED, spec.tied_embeddings)
    for module in modules:
        if plan.tp > 1:
            apply_tensor_parallel(module, mesh["tp"], plan.sequence_parallel)
        module.eval()
    if plan.pp > 1:
        loss = runner.step(tokens, targets)
    else:
        value = cross_entropy(modules[0](tokens), targets)
        value.backward()
        reduce_partial_grads(modules)
        loss = value.item()
    grads = {}
    for module in modules:
        for key, p in module.named_parameters(remove_duplicate=False):
            grad = p.grad
            if isinstance(grad, DTensor):  # a Partial gradient would pass full_tensor(), not an optimizer
                assert grad.placements == p.placements, f"{key}: {grad.placements} != {p.placements}"
                grad = grad.full_tensor()
            grads[key] = grad.numpy()  # numpy: torch tensors would travel as shared memory
    return loss, grads


def reference(name: str, layers: int | None, plan_fields: dict):
    spec, _, tokens, targets = setup(name, layers, plan_fields)
    model = Decoder(spec).eval()
    init_weights(model, SEED, spec.tied_embeddings)
    loss = cross_entropy(model(tokens), targets)
    loss.backward()
    return loss.item(), {key: p.grad for key, p in model.named_parameters(remove_duplicate=False)}


def check_against_reference(name: str, layers: int | None, plan_fields: dict, world_size: int) -> None:
    results = run_ranks(rank_step, world_size, args=(name, layers, plan_fields), timeout_s=120)
    ref_loss, ref_grads = reference(name, layers, plan_fields)
    plan = TrainingPlan(**BATCH, **plan_fields)
    last = [r for r in range(world_size) if r // plan.tp == plan.pp - 1]  # mesh (pp, tp), row-major
    for rank, (loss, grads) in enumerate(results):
        if rank in last:
            assert loss == pytest.approx(ref_loss, rel=1e-5), f"rank {rank}"
        else:
            assert loss is None
        for key, grad in grads.items():
            # atol: some gradients are zero in exact arithmetic (a key bias shifts every score equally)
            torch.testing.assert_close(torch.from_numpy(grad), ref_grads[key], rtol=1e-4, atol=1e-5,
                                       msg=lambda m, key=key, rank=rank: f"rank {rank}, {key}: {m}")
    assert set().union(*(grads for _, grads in results)) == set(ref_grads)


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp-sp"])
@pytest.mark.parametrize("name", ["gpt-debug", "llama-debug"])
def test_tensor_parallel_step_matches_one_process(name, sequence_parallel):
    check_against_reference(name, None, {"tp": 2, "sequence_parallel": sequence_parallel}, 2)


def block_collectives(rank: int, world_size: int) -> dict[str, dict[str, int]]:
    """Collectives of one Llama block's forward and backward, without and with SP."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode

    spec, mesh, counts = load_model("llama-debug"), init_device_mesh("cpu", (world_size,)), {}
    for sp in (False, True):
        stage = StageModule(spec, range(1), first=False, last=False)
        apply_tensor_parallel(stage, mesh, sp)
        x = torch.randn(2, spec.seq_length // (world_size if sp else 1), spec.hidden_size, requires_grad=True)
        with CommDebugMode() as forward:
            y = stage(x)
        with CommDebugMode() as backward:
            y.sum().backward()
        for phase, mode in (("forward", forward), ("backward", backward)):
            counts[f"{phase}, sp={sp}"] = {str(op).split(".")[-1]: n for op, n in mode.get_comm_counts().items()}
    return counts


def test_each_norm_costs_one_collective_each_way_as_in_megatron():
    counts = run_ranks(block_collectives, 2, timeout_s=60)[0]
    for phase in ("forward", "backward"):
        assert counts[f"{phase}, sp=False"] == {"all_reduce": 2}
        assert counts[f"{phase}, sp=True"] == {"all_gather_into_tensor": 2, "reduce_scatter_tensor": 2}


PIPELINES = {
    # GPT: tied embeddings (a head copy on the last stage), learned positions, uneven 3/1
    "1f1b-3/1": ("gpt-debug", None, {"pp": 2, "schedule": "1f1b", "stages": [{"layers": 3}, {"layers": 1}]}),
    "gpipe": ("llama-debug", None, {"pp": 2, "schedule": "gpipe"}),
    # 5 layers 3/2 over 2 chunks per rank: rank 0 holds chunks of 2 and 1 layers, rank 1 of 1 and 1
    "interleaved-3/2": ("gpt-debug", 5, {"pp": 2, "schedule": "interleaved", "virtual_stages": 2,
                                         "stages": [{"layers": 3}, {"layers": 2}]}),
}


@pytest.mark.parametrize("case", PIPELINES)
def test_pipeline_step_matches_one_process(case):
    check_against_reference(*PIPELINES[case], 2)


@pytest.mark.parametrize("name,layers,schedule", [("llama-debug", None, {"schedule": "1f1b"}),
                                                  ("gpt-debug", 5, PIPELINES["interleaved-3/2"][2])],
                         ids=["llama-1f1b", "gpt-interleaved"])
def test_tensor_and_pipeline_parallel_step_matches_one_process(name, layers, schedule):
    plan = {"pp": 2, **schedule, "tp": 2, "sequence_parallel": True}
    check_against_reference(name, layers, plan, 4)


@pytest.mark.parametrize("name,layers,fields", [
    ("gpt-debug", None, {"pp": 2, "stages": [{"layers": 3}, {"layers": 1}]}),
    ("llama-debug", 7, {"pp": 2, "schedule": "interleaved", "virtual_stages": 3,
                        "stages": [{"layers": 4}, {"layers": 3}]}),
])
def test_stages_hold_the_simulators_layers_and_parameters(name, layers, fields):
    spec, plan, _, _ = setup(name, layers, fields)
    costs = TrainingCostModel(spec, plan, load_cluster("2xcpu"))
    assert chunk_layers(spec, plan) == [[c.layers for c in s.chunks] for s in costs.build_stages()]
    ids = stage_layer_ids(spec, plan)
    assert [i for r in ids for i in r] == list(range(spec.num_layers))
    last = len(ids) - 1
    for g, layer_ids in enumerate(ids):
        with torch.device("meta"):
            module = StageModule(spec, layer_ids, g == 0, g == last)
        counted = sum(p.numel() for p in module.parameters())
        assert counted == costs.stage_params(len(layer_ids), g == 0, g == last)
