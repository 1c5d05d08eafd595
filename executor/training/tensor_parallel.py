"""Megatron-style tensor (and sequence) parallelism of the decoder's blocks, through DTensor.

`apply_tensor_parallel` rewrites a `Decoder`, or a pipeline stage module of the same shape
(`executor/training/pipeline.py`: optional `embed`/`pos`, `blocks`, optional `norm`/`head`),
in place over a 1-D tensor-parallel mesh:

    per block          without sequence parallel           with sequence parallel
    ---------          -------------------------           ----------------------
    block input        full sequence [b, s, h]             local shard [b, s/t, h]
    norm1, norm2       plain; output marked Replicate      SequenceParallel (shard in, shard
                                                           out), then one all-gather to Replicate
    q k v, up (gate)   ColwiseParallel: local heads / columns out, as plain tensors
    attention core     local heads: heads / t, kv_heads / t (GQA groups stay whole)
    o, down            RowwiseParallel: all-reduce         RowwiseParallel: reduce-scatter
                       to the full sequence                to the local shard
    dropout, residual  full sequence                       local shard

Why the norm's output is a Replicate DTensor rather than a plain tensor: the Q, K and V (and
up/gate) projections each add a Partial gradient to it, and DTensor sums them before the one
collective at the norm (all-reduce, or reduce-scatter with sequence parallel), as Megatron's
`f`/`g` operators do. A plain tensor would make each projection reduce its own gradient: the
same numbers with three (or two) collectives in place of one.

The embedding, learned positions, final norm and LM head stay replicated on every TP rank
(Megatron shards the embedding by vocabulary; the simulator divides them by t, see
`StageModel.extra_params`): each rank holds them whole and computes identical gradients for
them, since their inputs and the loss are identical on every rank. With sequence parallel
the embedding's output is cut to the local shard before the first block (its gradient is
gathered back), the final norm runs on the shard and its output is gathered for the head.
So the parameter count per TP rank is the blocks' parameters / t plus these whole.

With sequence parallel, each rank's norm weights (and biases) see only its shard of the
sequence: DTensor leaves their gradients Partial (a sum still to take over the TP ranks).
`reduce_partial_grads` takes it, once an iteration's backward is done and before clipping or
the optimizer, as Megatron all-reduces its layernorm gradients (`PipelineRunner.step` calls
it; a runner without pipeline stages calls it itself).

Dropout draws its masks from each rank's own generator: without sequence parallel it masks
the replicated residual stream, so the ranks of a TP group must share their seed (they then
draw the same masks, consuming the generator identically); with sequence parallel each rank
masks its own shard.

Only kv_heads divisible by t is supported (Megatron replicates K/V heads when t exceeds them).
A sharded block is a `LocalHeadsBlock`: its head counts are the local ones, which is all
`Block.attention` needs (it reshapes to the width the heads give).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from executor.training.model import Block


class LocalHeadsBlock(Block):
    """A `Block` whose Q, K, V projections return only this rank's heads: `heads` and
    `kv_heads` count the local heads (`Block.attention` reshapes to whatever width they give),
    and the class marks a block already sharded."""


def check_tensor_parallel(block: Block, tp: int) -> None:
    """Raise ValueError unless `tp` divides the block's heads, K/V heads and MLP width."""
    ffn = block.up.out_features
    for what, n in (("heads", block.heads), ("kv_heads", block.kv_heads), ("ffn_hidden_size", ffn)):
        if n % tp:
            raise ValueError(f"tensor parallel degree {tp} must divide {what} = {n}")


def apply_tensor_parallel(decoder: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shard every block of `decoder` (a Decoder or a pipeline stage module) over `tp_mesh`.

    Blocks, embedding and head must hold identical weights on every rank of the mesh (the
    column/row shards are cut from rank 0's copy). With `sequence_parallel`, activations
    between blocks are the local sequence shard [b, s/t, h]: a stage module without the
    embedding takes, and one without the head returns, that shard.
    """
    tp = tp_mesh.size()
    seq = Shard(1)
    between = seq if sequence_parallel else Replicate()  # layout of the residual stream
    blocks = list(decoder.blocks.values() if isinstance(decoder.blocks, nn.ModuleDict) else decoder.blocks)
    for block in blocks:
        if isinstance(block, LocalHeadsBlock):
            raise ValueError("apply_tensor_parallel: the module is already tensor-parallel")
        check_tensor_parallel(block, tp)
        plan = {
            "q": ColwiseParallel(), "k": ColwiseParallel(), "v": ColwiseParallel(),
            "up": ColwiseParallel(),
            "o": RowwiseParallel(output_layouts=between), "down": RowwiseParallel(output_layouts=between),
        }
        if block.gate is not None:
            plan["gate"] = ColwiseParallel()
        if sequence_parallel:
            plan |= {"norm1": SequenceParallel(), "norm2": SequenceParallel()}
        parallelize_module(block, tp_mesh, plan)
        # a second style on the norms: their output becomes a Replicate DTensor (see above)
        gather = PrepareModuleOutput(output_layouts=between, desired_output_layouts=Replicate(),
                                     use_local_output=False)
        parallelize_module(block, tp_mesh, {"norm1": gather, "norm2": gather})
        block.__class__ = LocalHeadsBlock
        block.heads, block.kv_heads = block.heads // tp, block.kv_heads // tp
    if not sequence_parallel:
        return
    if getattr(decoder, "embed", None) is not None:  # cut the full embedding to the local shard
        parallelize_module(blocks[0], tp_mesh, PrepareModuleInput(
            input_layouts=Replicate(), desired_input_layouts=seq, use_local_output=True))
    if getattr(decoder, "head", None) is not None:  # final norm on the shard, head on the whole
        parallelize_module(decoder, tp_mesh, {
            "norm": SequenceParallel(),
            "head": PrepareModuleInput(input_layouts=seq, desired_input_layouts=Replicate(),
                                       use_local_output=True),
        })


def reduce_partial_grads(modules: Iterable[nn.Module]) -> None:
    """Sum the gradients DTensor left Partial over their mesh (the sequence-parallel norms'),
    one all-reduce per parameter, so every gradient has its parameter's placement."""
    for module in modules:
        for p in module.parameters():
            grad = p.grad
            if isinstance(grad, DTensor) and any(pl.is_partial() for pl in grad.placements):
                p.grad = grad.redistribute(placements=[Replicate() if pl.is_partial() else pl
                                                       for pl in grad.placements])
