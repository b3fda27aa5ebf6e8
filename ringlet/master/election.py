"""Which live member is the master: a pure, deterministic choice every node makes for itself.

Every node sees the same membership (zenoh liveliness tokens), so every node picks the same master without a
vote: the member that started earliest, node id breaking ties. A newcomer started later, so a join never moves
the role and the event order goes on uninterrupted; when the master leaves, the next oldest takes over with the
state it has replicated. When two partitions merge, both sides pick the same master (the oldest of all), so the
cluster never keeps two. Start times come from the members' clocks and only need to be roughly comparable.
"""

from __future__ import annotations

from collections.abc import Iterable

from ringlet.net.membership import Member


def elect(members: Iterable[Member]) -> str | None:
    """The master among `members`; None when there are none."""
    live = list(members)
    if not live:
        return None
    return min(live, key=lambda m: (m.started_at, m.node_id)).node_id
