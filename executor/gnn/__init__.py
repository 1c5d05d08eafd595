"""Real distributed GNN training on this machine (DistDGL's design on torch.distributed gloo ranks).

    run.py       the parent: checks, partitioning when no store is given, launch, report, prediction
    rank.py      one trainer rank: its part, the epoch loop, evaluation
    loader.py    sampling and feature fetching inline or ahead of the trainer in threads
    sampler.py   neighbor sampling on CSR arrays, distributed over the owners of the rows
    features.py  a rank's feature rows, the cache of hot remote rows, the remote fetch
    exchange.py  the variable-sized all-to-all every remote request goes through
    model.py     GraphSAGE, GCN and GAT layers on sampled blocks
"""
