"""The GNN layers on sampled blocks, written with torch's scatter ops (PyG's layers would need
torch-geometric; these are small enough to own).

Each layer maps the features of a block's src nodes to its dst nodes (the first `num_dst` src
nodes), aggregating over the block's sampled edges:

- GraphSAGE, mean aggregator (Hamilton et al., NeurIPS 2017, eq. 1 with concat written as two
  linear maps): h_v' = W_self h_v + W_neigh mean_{u in N(v)} h_u.
- GCN (Kipf & Welling, ICLR 2017) on a sampled block: h_v' = W mean_{u in N(v) + v} h_u, the
  mean over the sampled neighbors and the node itself (the row-normalized form with a self
  loop, as DGL's SAGEConv 'gcn' aggregator computes it on blocks).
- GAT (Velickovic et al., ICLR 2018): per head, e_uv = LeakyReLU(a_l . W h_u + a_r . W h_v)
  over the sampled edges plus a self loop, softmax over each dst node's edges, weighted sum;
  heads concatenated in hidden layers, averaged in the output layer.

Between layers: ReLU and dropout (the model's `dropout`). The output layer gives class logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from executor.gnn.sampler import Block
from simulator.errors import SpecError
from simulator.specs.gnn import GNNModelSpec


def mean_matrix(block: Block, include_self: bool = False) -> torch.Tensor:
    """The (num_dst x num_src) sparse matrix whose row v averages v's sampled in-neighbors (and v
    itself with include_self): one sparse-dense product aggregates a layer, forward and backward,
    instead of gathering a row per edge (several times faster on one core)."""
    dst, src = block.dst, block.src
    if include_self:
        loops = torch.arange(block.num_dst)
        dst, src = torch.cat([dst, loops]), torch.cat([src, loops])
    count = torch.bincount(dst, minlength=block.num_dst).clamp(min=1).float()
    return torch.sparse_coo_tensor(torch.stack([dst, src]), 1.0 / count[dst],
                                   (block.num_dst, block.num_src), check_invariants=False).coalesce()


def mean_of_neighbors(h_src: torch.Tensor, block: Block, include_self: bool = False) -> torch.Tensor:
    """Mean of h over each dst node's sampled in-neighbors (and itself with include_self)."""
    return torch.sparse.mm(mean_matrix(block, include_self), h_src)


def dropout(h: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout with a uniform draw per element (torch's CPU bernoulli_ is about twice
    as slow for the same mask)."""
    if not training or p == 0:
        return h
    return h * (torch.rand_like(h) >= p).to(h.dtype).mul_(1.0 / (1.0 - p))


class SAGELayer(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.self_linear = nn.Linear(d_in, d_out)
        self.neigh_linear = nn.Linear(d_in, d_out, bias=False)

    def forward(self, h_src: torch.Tensor, block: Block) -> torch.Tensor:
        return self.self_linear(h_src[:block.num_dst]) + self.neigh_linear(mean_of_neighbors(h_src, block))


class GCNLayer(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)

    def forward(self, h_src: torch.Tensor, block: Block) -> torch.Tensor:
        return self.linear(mean_of_neighbors(h_src, block, include_self=True))


class GATLayer(nn.Module):
    def __init__(self, d_in: int, d_out: int, heads: int, concat: bool):
        super().__init__()
        self.heads, self.d_head, self.concat = heads, d_out // heads if concat else d_out, concat
        self.linear = nn.Linear(d_in, heads * self.d_head, bias=False)
        self.attn_src = nn.Parameter(torch.randn(heads, self.d_head) * self.d_head ** -0.5)
        self.attn_dst = nn.Parameter(torch.randn(heads, self.d_head) * self.d_head ** -0.5)
        self.bias = nn.Parameter(torch.zeros(heads * self.d_head if concat else self.d_head))

    def forward(self, h_src: torch.Tensor, block: Block) -> torch.Tensor:
        z = self.linear(h_src).view(-1, self.heads, self.d_head)
        out = gat_attention(z, block, self.attn_src, self.attn_dst)
        out = out.flatten(1) if self.concat else out.mean(1)
        return out + self.bias


def gat_attention(z: torch.Tensor, block: Block, attn_src: torch.Tensor, attn_dst: torch.Tensor) -> torch.Tensor:
    """GAT's attention over a block (with a self loop per dst node): the projected source rows
    `z` [src, heads, d_head] -> [dst, heads, d_head], the softmax over each dst node's edges."""
    heads, d_head = z.shape[1], z.shape[2]
    loops = torch.arange(block.num_dst)
    src, dst = torch.cat([block.src, loops]), torch.cat([block.dst, loops])
    score = F.leaky_relu((z[src] * attn_src).sum(-1) + (z[dst] * attn_dst).sum(-1), 0.2)
    peak = torch.full((block.num_dst, heads), float("-inf")).scatter_reduce(
        0, dst.unsqueeze(1).expand_as(score), score, "amax")
    weight = (score - peak[dst]).exp()
    norm = torch.zeros((block.num_dst, heads)).index_add_(0, dst, weight)
    return torch.zeros((block.num_dst, heads, d_head)).index_add_(0, dst, z[src] * (weight / norm[dst]).unsqueeze(-1))


class GNN(nn.Module):
    """The model's layers over a list of blocks (input side first)."""

    def __init__(self, spec: GNNModelSpec, in_dim: int, num_classes: int):
        super().__init__()
        check_model(spec)
        dims = [in_dim] + [spec.hidden_size] * (spec.num_layers - 1) + [num_classes]
        last = spec.num_layers - 1
        if spec.architecture == "graphsage":
            layers = [SAGELayer(dims[i], dims[i + 1]) for i in range(spec.num_layers)]
        elif spec.architecture == "gcn":
            layers = [GCNLayer(dims[i], dims[i + 1]) for i in range(spec.num_layers)]
        else:
            layers = [GATLayer(dims[i], dims[i + 1], spec.num_heads, concat=i < last)
                      for i in range(spec.num_layers)]
        self.layers = nn.ModuleList(layers)
        self.dropout = spec.dropout

    def forward(self, x: torch.Tensor, blocks: list[Block]) -> torch.Tensor:
        h = x
        for i, (layer, block) in enumerate(zip(self.layers, blocks)):
            h = layer(h, block)
            if i < len(self.layers) - 1:
                h = dropout(F.relu(h), self.dropout, self.training)
        return h


def check_model(spec: GNNModelSpec) -> None:
    """Refuse what these layers do not implement, naming the field."""
    if spec.embedding_dim is not None:
        raise SpecError("embedding_dim", spec.embedding_dim,
                        "the GNN executor trains on node features only; learnable node embeddings need None")
    if spec.architecture == "graphsage" and spec.aggregator != "mean":
        raise SpecError("aggregator", spec.aggregator, "the GNN executor implements graphsage's 'mean'")
