"""What a runner tells its node about its engine (Ready, FellBack) and the events the supervisor makes of it."""

from __future__ import annotations

import io
from types import SimpleNamespace

from ringlet.shared.instances import BoundInstance, Instance, InstanceType, Shard
from ringlet.shared.messages import FROM_RUNNER, FellBack, LoadShard, Ready
from ringlet.shared.state import Event, RunnerFellBack, RunnerReady
from ringlet.shared.wire import decode
from ringlet.worker.runner import FallbackWatch, Outbox, fallback_of, ready, running_engine
from ringlet.worker.supervisor import _Runner

OPTIMIZATION = "torch.compile of 60 MLP and norm layers (native torch.xpu, no IPEX)"


class FakeIpexEngine:
    """The attributes IpexEngine shows: its name (cpu once it fell back), what it applied, why it left the GPU."""

    def __init__(self) -> None:
        self.name, self.optimization, self.fallback_reason = "ipex", OPTIMIZATION, None

    def lose_device(self, reason: str) -> None:
        self.name, self.fallback_reason = "cpu", reason


def test_ready_says_what_the_engine_runs_on_and_applied() -> None:
    engine = FakeIpexEngine()
    told = ready(engine, "ipex", 4096, 1.5, slots=8)
    assert (told.engine, told.optimization, told.fallback, told.slots) == ("ipex", OPTIMIZATION, None, 8)


def test_engines_without_the_attributes_report_their_device_or_the_planned_engine() -> None:
    torch_on_cuda = SimpleNamespace(name="torch", device=SimpleNamespace(type="cuda"))
    assert running_engine(torch_on_cuda, "cuda") == "cuda"
    assert ready(torch_on_cuda, "cuda", 4096, 0.0).optimization is None
    assert running_engine(SimpleNamespace(name="torch-pipeline"), "ipex") == "ipex", "a ring's stage: as planned"
    # the CPU engine an ipex instance got at load, because this machine has no usable Intel GPU
    fell = SimpleNamespace(name="torch", device=SimpleNamespace(type="cpu"))
    assert fallback_of(fell, "ipex") == "ipex -> cpu: the ipex engine cannot run on this node (the node's log says why)"
    assert ready(fell, "ipex", 4096, 0.0).engine == "cpu"


def test_ready_says_how_the_models_template_writes_tool_calls() -> None:
    def holding(chat_template: str | None) -> SimpleNamespace:
        return SimpleNamespace(name="torch", device=SimpleNamespace(type="cpu"),
                               tokenizer=SimpleNamespace(chat_template=chat_template))

    assert ready(holding("{{ tools }}[TOOL_CALLS]"), "cpu", 4096, 0.0).tool_format == "mistral"
    assert ready(holding(None), "cpu", 4096, 0.0).tool_format == "hermes"
    assert ready(SimpleNamespace(name="torch-pipeline"), "cpu", 4096, 0.0).tool_format is None, "a middle stage"


def test_a_fallback_while_serving_is_sent_once() -> None:
    engine, stream = FakeIpexEngine(), io.BytesIO()
    watch = FallbackWatch(engine, "ipex", Outbox(stream), reported=None)
    watch()
    assert stream.getvalue() == b"", "nothing while it runs on its GPU"
    engine.lose_device("the device was lost (UR_RESULT_ERROR_DEVICE_LOST)")
    watch()
    watch()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    message = decode(FROM_RUNNER, lines[0], "test")
    assert message == FellBack(engine="cpu", reason="ipex -> cpu: the device was lost (UR_RESULT_ERROR_DEVICE_LOST)")


def test_a_fallback_at_load_is_in_ready_and_not_sent_again() -> None:
    engine, stream = FakeIpexEngine(), io.BytesIO()
    engine.lose_device("ipex -> cpu: warm-up failed 3 times")
    told = ready(engine, "ipex", 4096, 0.0)
    assert (told.engine, told.fallback) == ("cpu", "ipex -> cpu: warm-up failed 3 times"), "not prefixed twice"
    FallbackWatch(engine, "ipex", Outbox(stream), told.fallback)()
    assert stream.getvalue() == b""


def runner_emitting() -> tuple[_Runner, list[Event]]:
    instance = Instance(instance_id="inst-1", model="m", instance_type=InstanceType.IPEX_RING,
                        shards=[Shard(node_id="a", rank=0, start=0, end=20, num_layers=20, engine="ipex")])
    events: list[Event] = []
    return _Runner(LoadShard(bound=BoundInstance(instance=instance, node_id="a")), events.append), events


def test_the_supervisor_turns_ready_and_fell_back_into_events() -> None:
    runner, events = runner_emitting()
    runner._handle(Ready(context_length=4096, warmup_s=1.0, slots=4, engine="ipex", optimization=OPTIMIZATION,
                         tool_format="llama3"))
    runner._handle(FellBack(engine="cpu", reason="ipex -> cpu: the device was lost"))
    assert events == [
        RunnerReady(instance_id="inst-1", node_id="a", context_length=4096, engine="ipex", optimization=OPTIMIZATION,
                    tool_format="llama3"),
        RunnerFellBack(instance_id="inst-1", node_id="a", engine="cpu", reason="ipex -> cpu: the device was lost"),
    ]
    assert runner.ready and runner.slots == 4


def test_an_engine_name_the_state_cannot_hold_is_left_out() -> None:
    runner, events = runner_emitting()
    runner._handle(Ready(context_length=4096, warmup_s=1.0, engine="torch-pipeline", fallback="ipex -> cpu: lost"))
    runner._handle(FellBack(engine="vulkan", reason="ipex -> vulkan: lost"))
    assert events == [RunnerReady(instance_id="inst-1", node_id="a", context_length=4096, engine=None,
                                  fallback="ipex -> cpu: lost")]
