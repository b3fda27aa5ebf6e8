"""Real `ringlet node` processes on loopback form one cluster, agree on its state, and follow joins, departures and
the loss of the master."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest

from tests.support.processes import Cluster, wait_until

pytestmark = pytest.mark.slow


def test_three_nodes_agree_then_see_a_join_and_a_departure(cluster: Cluster) -> None:
    first, second, third = cluster.start("n1", "n2", "n3")
    state = cluster.wait_agreed(3)
    ids = {n.name: n.node_id for n in (first, second, third)}
    assert set(state["nodes"]) == set(ids.values())
    assert {info["name"] for info in state["nodes"].values()} == {"n1", "n2", "n3"}
    masters = {n.state()["master"] for n in cluster.live()}
    assert len(masters) == 1 and masters <= set(ids.values()), masters

    (fourth,) = cluster.start("n4")
    state = cluster.wait_agreed(4)
    assert fourth.node_id in state["nodes"]

    cluster.stop(second)
    state = cluster.wait_agreed(3)
    assert ids["n2"] not in state["nodes"]
    assert all(ids["n2"] not in n.state()["nodes"] for n in cluster.live())


def test_a_node_silent_for_less_than_the_lease_stays_a_member(cluster: Cluster) -> None:
    first, second = cluster.start("s1", "s2")
    cluster.wait_agreed(2)
    master = first.state()["master"]
    second.process.send_signal(signal.SIGSTOP)  # a stall: its connections stay open, nothing is answered
    try:
        time.sleep(6)
    finally:
        second.process.send_signal(signal.SIGCONT)
    time.sleep(2)
    state = cluster.wait_agreed(2)
    assert {n.state()["master"] for n in (first, second)} == {master}
    assert all("left" not in line for n in (first, second) for line in n.log().splitlines() if "member" in line), \
        cluster.logs()
    assert state["nodes"].keys() == {first.node_id, second.node_id}


def test_master_killed_another_takes_over_with_state_intact(cluster: Cluster) -> None:
    master, second, third = cluster.start("m1", "m2", "m3")
    cluster.wait_agreed(3)
    ids = {n.name: n.node_id for n in (master, second, third)}
    master_id = master.state()["master"]
    master = next(n for n in (master, second, third) if ids[n.name] == master_id)
    second, third = (n for n in cluster.live() if n is not master)
    created = second.post("/instance", json={"model": "SmolLM2-135M-Instruct", "instance_type": "CpuRing",
                                             "nodes": [ids[second.name], ids[third.name]]})
    assert created.status_code == 201, created.text
    instance_id = created.json()["instance"]["instance_id"]
    wait_until(lambda: second.get(f"/instance/{instance_id}").json()["status"] == "ready", 180,
               "the instance on m2+m3 ready", cluster.logs)

    cluster.stop(master, kill=True)
    state = cluster.wait_agreed(2, timeout_s=15)
    assert set(state["nodes"]) == {ids[second.name], ids[third.name]}
    for node in (second, third):
        seen = node.state()
        assert seen["master"] in (ids[second.name], ids[third.name])
        assert seen["instances"][instance_id]["status"] == "ready"
    reply = third.post("/v1/completions", json={"model": "SmolLM2-135M-Instruct", "prompt": "Hello",
                                                "max_tokens": 4, "temperature": 0})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] >= 1


def test_strangers_without_the_clusters_key_neither_join_nor_hear_nor_change_anything(cluster: Cluster) -> None:
    import json
    import time

    import zenoh

    from ringlet.net import topics
    from ringlet.net.trust import CLUSTER_KEY_ENV, token_of
    from tests.support.processes import launch_node

    (node,) = cluster.start("keeper")
    before = node.state()
    # a node of another cluster, told to connect to this one
    stranger = launch_node(cluster.root, "stranger", "--no-default-instance", "--connect",
                           f"tcp/127.0.0.1:{node.zenoh_port}", env={CLUSTER_KEY_ENV: token_of(bytes(32))})
    cluster.nodes.append(stranger)
    stranger.wait_healthy()
    # and a bare zenoh session (no TLS at all) listening to everything and publishing where events go
    config = zenoh.Config()
    config.insert_json5("mode", '"peer"')
    config.insert_json5("connect/endpoints", json.dumps([f"tcp/127.0.0.1:{node.zenoh_port}"]))
    config.insert_json5("scouting/multicast/enabled", "false")
    bare = zenoh.open(config)
    heard: list[str] = []
    subscriber = bare.declare_subscriber("**", lambda sample: heard.append(str(sample.key_expr)))
    try:
        time.sleep(3)
        assert heard == [] and list(bare.info.peers_zid()) == []  # nothing of the cluster's traffic
        forged = [topics.PROPOSALS, topics.ORDERED, f"{topics.MEMBERS}/node-forged/1"]
        for key in forged:
            bare.put(key, b'{"type": "ordered", "seq": 1}')
        time.sleep(2)
        assert heard == forged  # its own puts, delivered to itself only
        assert list(node.state()["nodes"]) == list(before["nodes"]) == [node.node_id]
        assert node.state()["instances"] == before["instances"]
        assert list(stranger.state()["nodes"]) == [stranger.node_id]
    finally:
        subscriber.undeclare()
        bare.close()


def test_a_forged_older_member_does_not_become_master_of_a_running_cluster(cluster: Cluster) -> None:
    """A peer holding the cluster's key announces a member that says it started in 1970: the master keeps its
    role and term, and the cluster goes on ordering (a newcomer is admitted)."""
    import time

    import zenoh

    from ringlet.net import topics
    from ringlet.net.session import NetOptions, zenoh_config
    from ringlet.net.trust import secret_of
    from tests.support.processes import TEST_CLUSTER_TOKEN

    first, _ = cluster.start("o1", "o2")
    state = cluster.wait_agreed(2)
    master, term = state["master"], state["term"]
    assert term >= 1
    insider = zenoh.open(zenoh_config(NetOptions(listen=("tcp/127.0.0.1:0",), discovery=False,
                                                 connect=(f"tcp/127.0.0.1:{first.zenoh_port}",),
                                                 secret=secret_of(TEST_CLUSTER_TOKEN))))
    token = insider.liveliness().declare_token(topics.member_token("node-forged", 1.0))
    try:
        wait_until(lambda: all("member node-forged joined" in n.log() for n in cluster.live()), 15,
                   "the nodes seeing the forged member", cluster.logs)
        time.sleep(1)
        for node in cluster.live():
            seen = node.state()
            assert (seen["master"], seen["term"]) == (master, term), seen
        cluster.start("o3")
        state = cluster.wait_agreed(3)
        assert state["master"] == master and "node-forged" not in state["nodes"]
    finally:
        token.undeclare()
        insider.close()


def test_the_master_killed_under_load_twice_leaves_every_node_the_same_state(cluster: Cluster) -> None:
    nodes = cluster.start("k1", "k2", "k3")
    cluster.wait_agreed(3)
    (serving,) = cluster.start("k4")  # admitted last: master after neither kill
    cluster.wait_agreed(4)
    by_id = {n.node_id: n for n in [*nodes, serving]}
    created = serving.post("/instance", json={"model": "SmolLM2-135M-Instruct", "instance_type": "CpuRing",
                                              "nodes": [serving.node_id]})
    assert created.status_code == 201, created.text
    assert serving.wait_for_instance(created.json()["instance"]["instance_id"])["status"] == "ready"

    replies: list[int] = []
    done = threading.Event()

    def load() -> None:  # requests one after another through the serving node while the masters die
        while not done.is_set():
            reply = serving.post("/v1/completions", json={"model": "SmolLM2-135M-Instruct", "prompt": "Hello",
                                                          "max_tokens": 8, "temperature": 0})
            replies.append(reply.status_code)

    loader = threading.Thread(target=load)
    loader.start()
    killed: set[str] = set()
    try:
        for _ in range(2):
            master = by_id[serving.state()["master"]]
            assert master is not serving
            killed.add(master.node_id)
            cluster.stop(master, kill=True)
            cluster.wait_agreed(len(cluster.live()), timeout_s=30)
            wait_until(lambda: len({json.dumps(comparable(n.state()), sort_keys=True) for n in cluster.live()}) == 1,
                       15, "every node with the same state", cluster.logs)
    finally:
        done.set()
        loader.join(timeout=60)
    assert replies and set(replies) == {200}, replies
    assert len(killed) == 2 and not killed & {n.state()["master"] for n in cluster.live()}


def comparable(state: dict) -> dict:  # type: ignore[type-arg]
    """What every node must agree on (tasks and downloads are each node's own view)."""
    return {k: state[k] for k in ("master", "term", "nodes", "instances", "links", "last_event")}
