"""Model commands between two control planes on loopback: a member's command runs on the other node and its answer
comes back; a command from a node that is not a member is refused there without running; a node that does not
answer is a 503 answer, not a hang."""

from __future__ import annotations

import asyncio

from ringlet.net.model_commands import ModelCommands
from ringlet.net.session import ControlPlane, NetOptions
from ringlet.shared.messages import CancelDownload, DeleteModel, ModelCommand, ModelCommandReply
from tests.support.processes import free_port


def test_commands_run_on_the_other_node_for_members_only() -> None:
    ran: list[ModelCommand] = []

    def run(command: ModelCommand) -> ModelCommandReply:
        ran.append(command)
        return ModelCommandReply(status=404, error=f"no download with id {command.download_id!r}",  # type: ignore[union-attr]
                                 code="download_not_found")

    async def exercise() -> tuple[ModelCommandReply, ModelCommandReply, ModelCommandReply]:
        port = free_port()
        asking = ControlPlane(NetOptions(listen=[f"tcp/127.0.0.1:{port}"], discovery=False))
        answering = ControlPlane(NetOptions(listen=[], connect=[f"tcp/127.0.0.1:{port}"], discovery=False))
        try:
            commands = ModelCommands(asking, "node-a", run, lambda node_id: True, timeout_s=2)
            ModelCommands(answering, "node-b", run, lambda node_id: node_id == "node-a")
            await asyncio.sleep(0.5)  # the queryables reach the other side
            answered = await commands.send("node-b", CancelDownload(origin="node-a", download_id="d-1"))
            refused = await commands.send("node-b", DeleteModel(origin="node-x", model="org/name"))
            silent = await commands.send("node-gone", CancelDownload(origin="node-a", download_id="d-2"))
            return answered, refused, silent
        finally:
            answering.close()
            asking.close()

    answered, refused, silent = asyncio.run(exercise())
    assert (answered.status, answered.code, answered.error) == (404, "download_not_found", "no download with id 'd-1'")
    assert [c.model_dump() for c in ran] == [CancelDownload(origin="node-a", download_id="d-1").model_dump()]
    assert refused.status == 503 and refused.code == "not_a_member" and "node-x" in (refused.error or "")
    assert silent.status == 503 and silent.code == "node_unreachable" and "node-gone" in (silent.error or "")
