"""One trainer rank of a GNN run: read its partition, train epochs of sampled mini-batches, time them.

`train_gnn_rank(rank, world_size, job)` is what `run_gnn` starts on every rank through
`profiler.ranks.run_ranks`. Rank r owns part r of the partition directory:

    load_partition(dir, r) -> DistSampler (its CSR rows) + FeatureStore (its rows, the cache)
    seeded GNN (the same weights on every rank), Adam
    iterations per epoch = all ranks' training nodes / (ranks x the plan's batch), rounded up
    per epoch: barrier, then for each chunk of this rank's shuffled training nodes
        Loader: sample -> fetch (inline or ahead in threads, as the plan says)
        compute: forward on the blocks, cross entropy on the seeds' labels, backward
        allreduce: the gradients, averaged over ranks (one flat bucket), then the Adam step
    evaluation (not timed): val and test accuracy over every rank's nodes, same fan-outs

The gradient all-reduce is DDP's (average of the ranks' gradients before every step), done
after backward in one flat buffer rather than overlapped with it, so that its time is measured
apart from compute; the model is small (one DDP bucket), so DDP would also send one message.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from executor.gnn.exchange import Exchange
from executor.gnn.features import FeatureStore, hottest_halo
from executor.gnn.loader import Loader, timed
from executor.gnn.model import GNN
from executor.gnn.sampler import DistSampler, MiniBatch
from simulator.gnn.store import PartitionData, load_partition
from simulator.specs.gnn import GNNModelSpec, GNNPlan

LEARNING_RATE = 3e-3  # DGL's distributed GraphSAGE example (train_dist.py --lr 0.003)
TIMED_PARTS = ("sample", "fetch_local", "fetch_remote", "compute", "allreduce", "stall")


@dataclass(frozen=True)
class GNNJob:
    """What every rank needs (picklable: it travels to spawned ranks)."""

    partition_dir: str
    model: GNNModelSpec
    plan: GNNPlan
    epochs: int
    seed: int
    evaluate: bool = True


def train_gnn_rank(rank: int, world_size: int, job: GNNJob) -> dict[str, Any]:
    """One trainer: train job.epochs epochs on part `rank`, return its measurements."""
    plan = job.plan
    part = load_partition(job.partition_dir, rank)
    sample_ex, fetch_ex = _exchanges(rank, world_size, plan)
    sampler = DistSampler(part.indptr, part.indices, part.owned, part.node_map, job.model.fanouts,
                          sample_ex, seed=job.seed * 7919 + rank)
    store = _feature_store(job.partition_dir, part, plan, fetch_ex)
    loader = Loader(sampler, store, plan.samplers_per_trainer, plan.pipeline_fetch)
    torch.manual_seed(job.seed)
    model = GNN(job.model, part.features.shape[1], int(part.meta["num_classes"]))
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    train = part.owned[part.train_mask]
    # DistDGL's node_split(force_even=True): every trainer runs the same number of batches, the
    # mean training set over the batch size; a part with more training nodes takes slightly
    # larger batches (by its imbalance) instead of extra iterations
    iterations = max(1, -(-_agree_sum(train.size) // (world_size * plan.batch_size_per_trainer)))
    rng = np.random.default_rng((job.seed, rank))
    epochs = []
    for _ in range(job.epochs):
        chunks = np.array_split(rng.permutation(train), iterations)
        epochs.append(_train_epoch(model, optimizer, loader, part, chunks, world_size))
        if job.evaluate:
            epochs[-1].update(evaluate(model, loader, part, plan.batch_size_per_trainer))
    return {"rank": rank, "owned_nodes": int(part.owned.size), "train_nodes": int(train.size),
            "halo_nodes": int(part.halo.size), "cached_nodes": store.cached_nodes,
            "iterations_per_epoch": iterations, "epochs": epochs}


def _exchanges(rank: int, world_size: int, plan: GNNPlan) -> tuple[Exchange, Exchange]:
    """The sampler's and the fetcher's exchanges, each on the group of the thread that runs it
    (executor.gnn.loader): new groups for the threads, the default group for the trainer's own."""
    sampler_thread = plan.samplers_per_trainer > 0
    fetch_group = dist.new_group(backend="gloo") if plan.pipeline_fetch else None
    sample_group = dist.new_group(backend="gloo") if sampler_thread else fetch_group
    return Exchange(rank, world_size, sample_group), Exchange(rank, world_size, fetch_group)


def _feature_store(partition_dir: str, part: PartitionData, plan: GNNPlan, exchange: Exchange) -> FeatureStore:
    if plan.feature_placement == "replicated":
        parts = [part if p == part.part else load_partition(partition_dir, p) for p in range(part.num_parts)]
        rows = np.concatenate([p.features for p in parts])
        nodes = np.concatenate([p.owned for p in parts])
        return FeatureStore(rows, nodes, part.node_map, exchange, plan.feature_dtype, replicated=True)
    cache = hottest_halo(part.halo, part.indices, plan.feature_cache_fraction)
    return FeatureStore(part.features, part.owned, part.node_map, exchange, plan.feature_dtype,
                        cache_nodes=cache)


def _agree_sum(value: int) -> int:
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item())


def _agree_max(value: int) -> int:
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _train_epoch(model: GNN, optimizer: torch.optim.Optimizer, loader: Loader, part: PartitionData,
                 chunks: list[np.ndarray], world_size: int) -> dict[str, Any]:
    timings = dict.fromkeys(TIMED_PARTS, 0.0)
    store, sample_ex = loader.store, loader.sampler.exchange
    bytes0, rows0, sample_bytes0 = store.remote_bytes, store.remote_rows, sample_ex.bytes_sent
    params = [p for p in model.parameters() if p.requires_grad]
    losses, input_nodes = [], []
    model.train()
    dist.barrier()
    t0, cpu0 = time.perf_counter(), time.process_time()
    for batch, x in loader.batches(chunks, timings):
        labels = torch.from_numpy(part.labels[part.local_index(batch.seeds)])
        losses.append(float(timed(timings, "compute", _forward_backward, model, optimizer, x, batch, labels)))
        timed(timings, "allreduce", _average_gradients, params, world_size)
        timed(timings, "compute", optimizer.step)
        input_nodes.append(batch.input_nodes.size)
    epoch_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    return {"epoch_time_s": epoch_s, "cpu_time_s": cpu_s, "iterations": len(chunks), "breakdown": timings,
            "remote_bytes": store.remote_bytes - bytes0, "remote_rows": store.remote_rows - rows0,
            "sampling_bytes": sample_ex.bytes_sent - sample_bytes0,
            "input_nodes_per_batch": float(np.mean(input_nodes)), "loss": float(np.mean(losses))}


def _forward_backward(model: GNN, optimizer: torch.optim.Optimizer, x: torch.Tensor, batch: MiniBatch,
                      labels: torch.Tensor) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    # a sum over at most a batch: a rank may get an empty chunk and must still take part
    loss = F.cross_entropy(model(x, batch.blocks), labels, reduction="sum") / max(1, labels.numel())
    loss.backward()
    return loss.detach()


def _average_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """DDP's gradient all-reduce in one flat bucket: every rank ends with the mean gradient."""
    if world_size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p)
        offset += n


@torch.no_grad()
def evaluate(model: GNN, loader: Loader, part: PartitionData, batch_size: int) -> dict[str, float]:
    """Accuracy on the val and test nodes of every rank (sampled like training, no dropout)."""
    model.eval()
    counts = []
    for mask in (part.val_mask, part.test_mask):
        nodes = part.owned[mask] if mask is not None else part.owned[:0]
        iterations = _agree_max(max(1, -(-nodes.size // batch_size)))
        correct = 0
        for batch, x in loader.batches(np.array_split(nodes, iterations), {}, inline=True):
            predicted = model(x, batch.blocks).argmax(1).numpy()
            correct += int((predicted == part.labels[part.local_index(batch.seeds)]).sum())
        counts += [correct, nodes.size]
    total = torch.tensor(counts, dtype=torch.float64)
    dist.all_reduce(total)
    val_correct, val_n, test_correct, test_n = total.tolist()
    return {"val_accuracy": val_correct / val_n if val_n else None,
            "test_accuracy": test_correct / test_n if test_n else None}

