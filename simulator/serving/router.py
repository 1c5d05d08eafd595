"""The router in front of data-parallel replicas: which replica takes an arriving request.

Join the shortest queue: the replica with the fewest outstanding requests (routed to it and
not finished) at the request's arrival, the lowest index on a tie. The simulator's arrival
process (simulator/serving/simulate.py) and the real engine's replicas
(executor/serving/replicas.py) both call `least_outstanding`, so the two route alike.
"""

from __future__ import annotations

from collections.abc import Sequence


def least_outstanding(outstanding: Sequence[int]) -> int:
    """The index of the replica to route to, given each replica's outstanding requests."""
    if not outstanding:
        raise ValueError("outstanding: no replicas to route to (dp must be >= 1)")
    return min(range(len(outstanding)), key=outstanding.__getitem__)
