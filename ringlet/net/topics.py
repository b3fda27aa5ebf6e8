"""Key expressions of the control plane. Every key starts with `ringlet/` so other zenoh users can share a LAN."""

from __future__ import annotations

ROOT = "ringlet"
MEMBERS = f"{ROOT}/members"  # liveliness tokens: ringlet/members/{node_id}/{started_at_ms}
MASTERS = f"{ROOT}/masters"  # liveliness tokens of master claims: ringlet/masters/{node_id}/{term}
PROPOSALS = f"{ROOT}/events/proposed"  # any node -> master: an event to order
ORDERED = f"{ROOT}/events/ordered"  # master -> all: events with their sequence number
STATE = f"{ROOT}/state"  # queryable on every node: its current state (a newcomer asks the master's)


def member_token(node_id: str, started_at: float) -> str:
    return f"{MEMBERS}/{node_id}/{int(started_at * 1000)}"


def parse_member_token(key: str) -> tuple[str, float]:
    """(node_id, started_at) from a member token's key; ValueError if the key is not one."""
    node_id, started_ms = _node_and_number(key, MEMBERS, "member token", "STARTED_AT_MS")
    return node_id, started_ms / 1000


def master_claim(node_id: str, term: int) -> str:
    return f"{MASTERS}/{node_id}/{term}"


def parse_master_claim(key: str) -> tuple[str, int]:
    """(node_id, term) from a master claim's key; ValueError if the key is not one."""
    return _node_and_number(key, MASTERS, "master claim", "TERM")


def _node_and_number(key: str, root: str, what: str, number: str) -> tuple[str, int]:
    parts = key.split("/")
    if len(parts) != 4 or f"{parts[0]}/{parts[1]}" != root or not parts[2] or not parts[3].isdigit():
        raise ValueError(f"{key!r} is not a {what} (expected {root}/NODE_ID/{number})")
    return parts[2], int(parts[3])


def node_tasks(node_id: str) -> str:
    """Tasks sent to the node that runs an instance's first stage."""
    return f"{ROOT}/nodes/{node_id}/tasks"


def task_stream(task_id: str) -> str:
    """Chunks of one task, from the first stage's node to the node whose API received it."""
    return f"{ROOT}/tasks/{task_id}/stream"


def task_cancel(task_id: str) -> str:
    return f"{ROOT}/tasks/{task_id}/cancel"


def state_of(node_id: str) -> str:
    return f"{STATE}/{node_id}"


def node_models(node_id: str) -> str:
    """Queryable on every node: commands on its model store (download, cancel, delete) from the others."""
    return f"{ROOT}/nodes/{node_id}/models"
