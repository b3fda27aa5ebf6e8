"""Commands on another node's model store, over the control plane: a node's API starts, cancels or deletes a
download on any node of the cluster. A command goes to the chosen node's queryable (`topics.node_models`) as a typed
message; its answer (`ModelCommandReply`) comes back and is the API's answer there.

Only the cluster is heard, as for every other message between nodes: each link is mutual TLS from the cluster's
secret (`net/trust.py`), so a peer without it never reaches the queryable; and, as the master refuses proposals from
a node that is not a live member, a command whose origin is not one is refused."""

from __future__ import annotations

import logging
from collections.abc import Callable

from ringlet.net import topics
from ringlet.net.session import ControlPlane
from ringlet.shared.messages import MODEL_COMMAND, MODEL_COMMAND_REPLY, ModelCommand, ModelCommandReply

log = logging.getLogger(__name__)

# long enough for a node that lists or removes a large model directory, short enough for an HTTP client to wait
ANSWER_TIMEOUT_S = 20.0


class ModelCommands:
    def __init__(self, plane: ControlPlane, node_id: str, run: Callable[[ModelCommand], ModelCommandReply],
                 is_member: Callable[[str], bool], timeout_s: float = ANSWER_TIMEOUT_S) -> None:
        """`run` executes a command on this node's store (on a worker thread); `is_member(node_id)`: whether a node
        is a live member of the cluster now."""
        self._plane, self._run, self._is_member, self._timeout_s = plane, run, is_member, timeout_s
        plane.answer(topics.node_models(node_id), MODEL_COMMAND, self._on_command)

    async def send(self, node_id: str, command: ModelCommand) -> ModelCommandReply:
        """Run `command` on `node_id`; its answer, or a 503 one when it gave none in time."""
        reply = await self._plane.request(topics.node_models(node_id), command, MODEL_COMMAND_REPLY, self._timeout_s)
        if reply is None:
            return ModelCommandReply(status=503, code="node_unreachable",
                                     error=f"node {node_id} did not answer within {self._timeout_s:.0f} s (it or the "
                                           "link to it is gone, or it runs another ringlet version); try again")
        return reply

    def _on_command(self, command: ModelCommand) -> ModelCommandReply:
        if not self._is_member(command.origin):
            log.warning("refused a %s from %s: not a member of the cluster", command.type, command.origin)
            return ModelCommandReply(status=503, code="not_a_member",
                                     error=f"node {command.origin} is not a member of this cluster")
        log.info("%s from node %s", command.type, command.origin)
        return self._run(command)
