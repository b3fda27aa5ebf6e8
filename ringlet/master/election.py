"""Which live member is the master: a deterministic choice every node makes for itself from what it sees.

A master holds the role for a term. It announces a claim, a liveliness token carrying its term that lives as long
as its session, and every event it orders carries that term. While a live member claims the role, that member is
master: a node that joins defers to it whatever its clock says, and an ordered event of an older term is stale.

Only when no live member claims the role (a cluster forming, or its master gone) do the nodes pick one, each for
itself and all alike: the live member the cluster admitted first (the order of the replicated state's nodes), or,
in a cluster that has admitted none of them yet, the one that started earliest (node id breaking ties; start times
come from the members' clocks and need only be roughly comparable). The pick claims the term after the last one it
knows. When two partitions merge, each with its master, the claim of the higher term wins (the earlier start on a
tie); the other master steps down and its side rejoins the winner's cluster.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ringlet.net.membership import Claim, Member


@dataclass(frozen=True)
class Leader:
    node_id: str
    term: int | None  # the term it claims; None: picked by the members, its claim not yet seen


def elect(members: Iterable[Member], claims: Iterable[Claim] = (), admitted: Sequence[str] = ()) -> Leader | None:
    """The master among the live `members`, given the live `claims` and the node ids in the order the cluster
    admitted them; None when there are no members."""
    live = {m.node_id: m for m in members}
    if not live:
        return None
    standing = [c for c in claims if c.node_id in live]
    if standing:
        best = min(standing, key=lambda c: (-c.term, live[c.node_id].started_at, c.node_id))
        return Leader(best.node_id, best.term)
    for node_id in admitted:
        if node_id in live:
            return Leader(node_id, None)
    oldest = min(live.values(), key=lambda m: (m.started_at, m.node_id))
    return Leader(oldest.node_id, None)
