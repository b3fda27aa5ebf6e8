from ringlet.master.election import Leader, elect
from ringlet.net.membership import Claim, Member
from ringlet.net.topics import master_claim, member_token, parse_master_claim, parse_member_token


def master_of(*args, **kwargs) -> str | None:  # type: ignore[no-untyped-def]
    leader = elect(*args, **kwargs)
    return None if leader is None else leader.node_id


def test_no_members_no_master() -> None:
    assert elect([]) is None


def test_a_forming_cluster_picks_its_earliest_member_regardless_of_order() -> None:
    members = [Member(node_id="node-b", started_at=2.0), Member(node_id="node-a", started_at=3.0),
               Member(node_id="node-c", started_at=1.0)]
    assert elect(members) == Leader("node-c", None)
    assert elect(reversed(members)) == Leader("node-c", None)


def test_node_id_breaks_ties() -> None:
    members = [Member(node_id="node-b", started_at=1.0), Member(node_id="node-a", started_at=1.0)]
    assert master_of(members) == "node-a"


def test_a_claiming_master_keeps_the_role_whatever_the_clocks_of_newcomers_say() -> None:
    master, second = Member(node_id="node-z", started_at=5.0), Member(node_id="node-b", started_at=6.0)
    forged = Member(node_id="node-a", started_at=0.001)  # claims to have started in 1970
    claims = [Claim(node_id="node-z", term=3)]
    assert elect([master, second, forged], claims, admitted=["node-z", "node-b"]) == Leader("node-z", 3)


def test_without_a_live_claim_the_first_admitted_live_member_succeeds() -> None:
    second, forged = Member(node_id="node-b", started_at=6.0), Member(node_id="node-a", started_at=0.001)
    claims = [Claim(node_id="node-z", term=3)]  # the master's claim, heard before its member token went away
    assert master_of([second, forged], claims, admitted=["node-z", "node-b"]) == "node-b"
    assert master_of([second, forged], admitted=[]) == "node-a", "a cluster that admitted none: the clocks decide"


def test_merging_partitions_follow_the_higher_term_then_the_earlier_start() -> None:
    old, young = Member(node_id="node-a", started_at=1.0), Member(node_id="node-b", started_at=2.0)
    assert elect([old, young], [Claim(node_id="node-a", term=1), Claim(node_id="node-b", term=2)]) == Leader("node-b", 2)
    assert master_of([old, young], [Claim(node_id="node-a", term=2), Claim(node_id="node-b", term=2)]) == "node-a"


def test_nodes_started_within_one_millisecond_elect_the_same_master() -> None:
    """Each node compares itself with the others by the start time their liveliness tokens carry (whole ms)."""
    b, a = Member.starting_now("node-b", 1000.0004), Member.starting_now("node-a", 1000.0006)

    def as_seen(member: Member) -> Member:  # through its token, as the other node sees it
        return Member(node_id=member.node_id,
                      started_at=parse_member_token(member_token(member.node_id, member.started_at))[1])

    assert master_of([b, as_seen(a)]) == master_of([a, as_seen(b)]) == "node-a"  # same ms: the node id decides


def test_master_claim_keys_round_trip_and_bad_ones_are_refused() -> None:
    assert parse_master_claim(master_claim("node-a", 7)) == ("node-a", 7)
    for bad in ("ringlet/masters/node-a", "ringlet/masters/node-a/x", "ringlet/members/node-a/7"):
        try:
            parse_master_claim(bad)
        except ValueError as error:
            assert "NODE_ID/TERM" in str(error)
        else:
            raise AssertionError(f"{bad!r} was taken for a claim")
