from ringlet.master.election import Member, elect


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
