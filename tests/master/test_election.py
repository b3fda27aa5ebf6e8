from ringlet.master.election import elect
from ringlet.net.membership import Member
from ringlet.net.topics import member_token, parse_member_token


def test_no_members_no_master() -> None:
    assert elect([]) is None


def test_earliest_member_wins_regardless_of_order() -> None:
    members = [Member(node_id="node-b", started_at=2.0), Member(node_id="node-a", started_at=3.0),
               Member(node_id="node-c", started_at=1.0)]
    assert elect(members) == "node-c"
    assert elect(reversed(members)) == "node-c"


def test_node_id_breaks_ties() -> None:
    members = [Member(node_id="node-b", started_at=1.0), Member(node_id="node-a", started_at=1.0)]
    assert elect(members) == "node-a"


def test_newcomer_does_not_take_over_and_survivor_does_when_master_leaves() -> None:
    master, second = Member(node_id="node-z", started_at=1.0), Member(node_id="node-b", started_at=2.0)
    newcomer = Member(node_id="node-a", started_at=3.0)
    assert elect([master, second, newcomer]) == "node-z"
    assert elect([second, newcomer]) == "node-b"


def test_nodes_started_within_one_millisecond_elect_the_same_master() -> None:
    """Each node compares itself with the others by the start time their liveliness tokens carry (whole ms)."""
    b, a = Member.starting_now("node-b", 1000.0004), Member.starting_now("node-a", 1000.0006)

    def as_seen(member: Member) -> Member:  # through its token, as the other node sees it
        return Member(node_id=member.node_id,
                      started_at=parse_member_token(member_token(member.node_id, member.started_at))[1])

    assert elect([b, as_seen(a)]) == elect([a, as_seen(b)]) == "node-a"  # same ms: the node id decides
