"""Downloads against a local fake hub: whole, per stage, resumed, verified, cancelled, offline."""

from __future__ import annotations

import hashlib
import random
import threading
import time
from pathlib import Path

import pytest

from ringlet.models.download import (
    DownloadCancelled,
    DownloadError,
    DownloadManager,
    DownloadProgress,
    HubSettings,
    HubUnreachable,
    NotEnoughDiskSpace,
    RemoteFile,
    SavedDownload,
    TooManyDownloads,
    download_model,
)
from ringlet.models.safetensors_loader import tensor_in_range
from ringlet.models.store import INCOMPLETE_DIR, ModelStore, find_local
from ringlet.shared.errors import ModelLoadError
from ringlet.shared.saved import SavedList
from tests.support.fake_hub import FakeHub, HubRepo
from tests.support.hub import NUM_LAYERS, REPO_ID

DOWNLOAD_CHUNK = 10 * 1024 * 1024  # huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE
MODEL_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "model.safetensors.index.json"}


def shards_for(weight_map: dict[str, str], start: int, end: int) -> set[str]:
    return {f for name, f in weight_map.items() if tensor_in_range(name, start, end, NUM_LAYERS, False)}


def fetched(hub: FakeHub) -> set[str]:
    """Names of the files whose bytes were requested (the CDN hop counted under its file name)."""
    names = set()
    for repo in hub.repos.values():
        for name in repo.files:
            if hub.file_gets(name):
                names.add(name)
    return names


def assert_whole(directory: Path, served: dict[str, bytes], names: set[str]) -> None:
    for name in names:
        assert hashlib.sha256((directory / name).read_bytes()).hexdigest() == hashlib.sha256(served[name]).hexdigest()


def test_full_download_fetches_model_files_only(hub: FakeHub, tiny_checkpoint: dict[str, bytes]) -> None:
    updates: list[DownloadProgress] = []
    path = download_model(REPO_ID, progress=updates.append)

    shards = {n for n in tiny_checkpoint if n.endswith(".safetensors")}
    assert path == ModelStore().root / REPO_ID
    assert {p.name for p in path.iterdir() if p.is_file()} == MODEL_FILES | shards
    assert_whole(path, tiny_checkpoint, MODEL_FILES | shards)
    assert "README.md" not in fetched(hub) and "original/consolidated.00.pth" not in fetched(hub)
    assert not list((path / INCOMPLETE_DIR).iterdir())
    final = updates[-1]
    assert final.done == final.total == sum(len(tiny_checkpoint[n]) for n in MODEL_FILES | shards)
    assert {f.name for f in final.files} == MODEL_FILES | shards
    stored = ModelStore().get(REPO_ID)
    assert stored is not None and stored.status == "complete" and stored.detail == f"{NUM_LAYERS}/{NUM_LAYERS} layers"


def test_stage_download_fetches_only_the_files_of_its_layers(
    hub: FakeHub, tiny_checkpoint: dict[str, bytes], weight_map: dict[str, str]
) -> None:
    first = shards_for(weight_map, 0, 1)
    assert len(first) < len(set(weight_map.values())), "the test needs a stage that does not span every file"
    path = download_model(REPO_ID, layers=(0, 1))
    assert fetched(hub) == MODEL_FILES | first
    assert_whole(path, tiny_checkpoint, first)
    stored = ModelStore().get(REPO_ID)
    assert stored is not None and stored.status == "partial" and stored.detail == f"layers 0 of {NUM_LAYERS}"
    assert find_local(REPO_ID) == path  # a stage can be loaded from a partial download

    hub.requests.clear()
    download_model(REPO_ID, layers=(1, NUM_LAYERS))
    rest = shards_for(weight_map, 1, NUM_LAYERS)
    assert fetched(hub) == rest - first  # what the first stage fetched is not fetched again
    assert ModelStore().get(REPO_ID).status == "complete"  # type: ignore[union-attr]


def test_a_repo_without_index_is_fetched_whole_and_layers_are_checked(
    hub: FakeHub, tiny_checkpoint: dict[str, bytes]
) -> None:
    files = {n: tiny_checkpoint[n] for n in ("config.json", "tokenizer.json")}
    hub.repos["single/file"] = HubRepo(files | {"model.safetensors": b"only the download is tested" * 100})
    with pytest.raises(DownloadError, match=rf"layers 0:99 are outside the model's 0:{NUM_LAYERS}"):
        download_model("single/file", layers=(0, 99))
    path = download_model("single/file", layers=(0, 1))
    assert (path / "model.safetensors").is_file() and fetched(hub) == set(files) | {"model.safetensors"}


def test_download_cut_mid_file_resumes_with_a_range_request(hub: FakeHub) -> None:
    # huggingface_hub writes whole 10 MiB chunks: a cut after the first one resumes from its end
    data = random.Random(0).randbytes(2 * DOWNLOAD_CHUNK + 2_000_000)  # cut at its half
    hub.repos["ringlet-test/big-GGUF"] = HubRepo({"big.Q8_0.gguf": data})
    hub.drop_once.add("big.Q8_0.gguf")
    path = download_model("ringlet-test/big-GGUF")
    assert [r.range for r in hub.file_gets("big.Q8_0.gguf") if r.path.startswith("/cdn/")] == [
        None, f"bytes={DOWNLOAD_CHUNK}-"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()


def test_download_cut_in_its_first_chunk_starts_over(hub: FakeHub, tiny_checkpoint: dict[str, bytes]) -> None:
    victim = max((n for n in tiny_checkpoint if n.endswith(".safetensors")), key=lambda n: len(tiny_checkpoint[n]))
    hub.drop_once.add(victim)
    path = download_model(REPO_ID)
    assert [r.range for r in hub.file_gets(victim) if r.path.startswith("/cdn/")] == [None, None]
    assert_whole(path, tiny_checkpoint, {victim})


def test_partial_bytes_of_an_earlier_run_are_resumed(hub: FakeHub, tiny_checkpoint: dict[str, bytes]) -> None:
    name = "model-00002-of-00007.safetensors"
    data = tiny_checkpoint[name]
    partial = _partial_path(name, data)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data[:1000])
    path = download_model(REPO_ID)
    assert [r.range for r in hub.file_gets(name) if r.path.startswith("/cdn/")] == ["bytes=1000-"]
    assert_whole(path, tiny_checkpoint, {name})
    assert not partial.exists()


def test_damaged_partial_bytes_are_thrown_away(hub: FakeHub, tiny_checkpoint: dict[str, bytes]) -> None:
    name = "model-00003-of-00007.safetensors"
    partial = _partial_path(name, tiny_checkpoint[name])
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\0" * 1000)  # not the file's first bytes: the sha256 check must catch it
    path = download_model(REPO_ID)
    assert [r.range for r in hub.file_gets(name) if r.path.startswith("/cdn/")] == ["bytes=1000-", None]
    assert_whole(path, tiny_checkpoint, {name})


def test_corrupted_file_on_disk_is_fetched_again(hub: FakeHub, tiny_checkpoint: dict[str, bytes]) -> None:
    path = download_model(REPO_ID)
    name = "model-00004-of-00007.safetensors"
    damaged = bytearray((path / name).read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # same size: only the hash can tell
    (path / name).write_bytes(bytes(damaged))
    hub.requests.clear()
    download_model(REPO_ID)
    assert fetched(hub) == {name}
    assert_whole(path, tiny_checkpoint, {name})


def test_unknown_repo_is_a_clear_404(hub: FakeHub) -> None:
    with pytest.raises(DownloadError, match=r"model 'nobody/no-such-model' not found at http://127\.0\.0\.1.*404"):
        download_model("nobody/no-such-model")
    assert not (ModelStore().root / "nobody").exists()


def test_not_enough_disk_space_stops_before_fetching_weights(hub: FakeHub, tiny_checkpoint: dict[str, bytes]) -> None:
    support = sum(len(tiny_checkpoint[n]) for n in MODEL_FILES)
    with pytest.raises(NotEnoughDiskSpace, match=rf"not enough disk space for {REPO_ID}: 7 file\(s\) need .* free"):
        download_model(REPO_ID, free_space=lambda _path: support + 1000)
    assert not any(n.endswith(".safetensors") for n in fetched(hub))
    assert not list((ModelStore().root / REPO_ID).glob("*.safetensors"))


def test_cancel_stops_between_chunks_and_leaves_no_half_file(hub: FakeHub, tiny_checkpoint: dict[str, bytes]) -> None:
    cancel = threading.Event()

    def cancel_on_first_weight_bytes(update: DownloadProgress) -> None:
        if any(f.name.endswith(".safetensors") and f.done for f in update.files):
            cancel.set()

    with pytest.raises(DownloadCancelled, match="run it again to resume"):
        download_model(REPO_ID, progress=cancel_on_first_weight_bytes, cancel=cancel, max_workers=1)
    directory = ModelStore().root / REPO_ID
    shards = {n for n in tiny_checkpoint if n.endswith(".safetensors")}
    present = {p.name for p in directory.glob("*.safetensors")}
    assert present < shards  # stopped before the end
    assert_whole(directory, tiny_checkpoint, present)  # whatever has its final name is whole
    assert ModelStore().get(REPO_ID).status != "complete"  # type: ignore[union-attr]

    download_model(REPO_ID)
    assert_whole(directory, tiny_checkpoint, shards)


def test_cancel_mid_file_keeps_a_clean_prefix_that_the_next_run_resumes(hub: FakeHub) -> None:
    data = random.Random(1).randbytes(2 * DOWNLOAD_CHUNK + 1000)
    hub.repos["ringlet-test/big-GGUF"] = HubRepo({"big.Q8_0.gguf": data})
    cancel = threading.Event()

    def cancel_after_first_chunk(update: DownloadProgress) -> None:
        if 0 < update.done < update.total:
            cancel.set()

    with pytest.raises(DownloadCancelled):
        download_model("ringlet-test/big-GGUF", progress=cancel_after_first_chunk, cancel=cancel)
    directory = ModelStore().root / "ringlet-test/big-GGUF"
    assert not (directory / "big.Q8_0.gguf").exists()
    (partial,) = (directory / INCOMPLETE_DIR).iterdir()
    assert partial.read_bytes() == data[:DOWNLOAD_CHUNK]  # the chunk in flight at cancel time was not written

    path = download_model("ringlet-test/big-GGUF")
    assert [r.range for r in hub.file_gets("big.Q8_0.gguf") if r.path.startswith("/cdn/")] == [
        None, f"bytes={DOWNLOAD_CHUNK}-"]
    assert path.read_bytes() == data and not partial.exists()


def test_offline_uses_only_what_is_on_disk(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    download_model(REPO_ID, layers=(0, 1))
    hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert download_model(REPO_ID, layers=(0, 1)) == ModelStore().root / REPO_ID
    with pytest.raises(DownloadError, match=rf"offline: {REPO_ID} on disk has layers 0 of {NUM_LAYERS} \(partial\), not what layers all need"):
        download_model(REPO_ID)
    with pytest.raises(DownloadError, match="offline: nobody/else is not on disk"):
        download_model("nobody/else", settings=HubSettings(offline=True))


def test_an_unreachable_hub_falls_back_to_what_is_on_disk(hub: FakeHub) -> None:
    path = download_model(REPO_ID, layers=(0, 1))
    hub.stop()
    assert download_model(REPO_ID, layers=(0, 1)) == path
    with pytest.raises(HubUnreachable, match=f"cannot reach {hub.url} for {REPO_ID}"):
        download_model(REPO_ID)


def test_read_only_extra_directory_is_used_without_network(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = download_model(REPO_ID)
    shared = tmp_path / "shared-models"
    (shared / "ringlet-test").mkdir(parents=True)
    path.rename(shared / REPO_ID)
    monkeypatch.setenv("RINGLET_MODEL_DIRS", f"{tmp_path / 'absent'}:{shared}")
    hub.requests.clear()
    assert download_model(REPO_ID) == shared / REPO_ID
    assert hub.requests == []
    stored = ModelStore().get(REPO_ID)
    assert stored is not None and stored.read_only and find_local(REPO_ID) == shared / REPO_ID
    with pytest.raises(ModelLoadError, match="read-only directory .*shared-models"):
        ModelStore().remove(REPO_ID)


def test_gated_repo_needs_hf_token(hub: FakeHub, tiny_checkpoint: dict[str, bytes],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    hub.repos["gated/model"] = HubRepo(dict(tiny_checkpoint), token="hf_secret")
    with pytest.raises(DownloadError, match=r"gated/model is gated: accept its licence .* set HF_TOKEN"):
        download_model("gated/model")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    path = download_model("gated/model", layers=(0, 1))
    assert (path / "config.json").read_bytes() == tiny_checkpoint["config.json"]


def test_gguf_repo_fetches_the_named_quantisation(hub: FakeHub) -> None:
    hub.repos["someone/tiny-GGUF"] = HubRepo({"tiny.Q4_K_M.gguf": b"GGUF" + b"4" * 5000,
                                             "tiny.Q8_0.gguf": b"GGUF" + b"8" * 9000, "README.md": b"hi"})
    with pytest.raises(ModelLoadError, match=r"several GGUF files match .*someone/tiny-GGUF:Q4_K_M"):
        download_model("someone/tiny-GGUF")
    path = download_model("someone/tiny-GGUF:q8_0")
    assert path.name == "tiny.Q8_0.gguf" and path.read_bytes() == b"GGUF" + b"8" * 9000
    assert fetched(hub) == {"tiny.Q8_0.gguf"}
    assert find_local("someone/tiny-GGUF") == path  # the only one on disk


def test_download_manager_runs_reports_and_cancels(hub: FakeHub, tiny_checkpoint: dict[str, bytes]) -> None:
    published = []
    manager = DownloadManager(on_update=published.append, publish_interval=0)
    hub.slow_files.add("config.json")  # keeps the first download running while we start it again
    started = manager.start(REPO_ID, layers=(0, 2))
    assert manager.start(REPO_ID, layers=(0, 2)).download_id == started.download_id  # joined, not doubled
    hub.slow_files.clear()
    done = manager.wait(started.download_id, timeout=30)
    assert done.state == "done" and done.path == str(ModelStore().root / REPO_ID)
    assert done.done == done.total > 0 and published[-1] == done
    assert [s.download_id for s in manager.statuses()] == [started.download_id]
    with pytest.raises(DownloadError, match="no download with id 'nope'"):
        manager.cancel("nope")

    hub.slow_files.add("model-00007-of-00007.safetensors")  # stays in flight until we cancel
    running = manager.start(REPO_ID)
    manager.cancel(running.download_id)
    hub.slow_files.clear()
    stopped = manager.wait(running.download_id, timeout=30)
    assert stopped.state == "cancelled" and "resume" in (stopped.error or "")
    failed = manager.wait(manager.start("nobody/missing").download_id, timeout=30)
    assert failed.state == "failed" and "nobody/missing" in (failed.error or "")
    manager.close()


def test_progress_held_back_by_the_publish_interval_is_published_when_it_ends(hub: FakeHub) -> None:
    published = []
    manager = DownloadManager(on_update=published.append, publish_interval=0.5)
    shards = sorted(name for name in hub.repos[REPO_ID].files if name.endswith(".safetensors"))
    hub.slow_files.add(shards[-1])  # the download stalls half-way through its last file: no progress follows
    started = manager.start(REPO_ID)
    try:
        def stalled() -> bool:
            done = manager.status(started.download_id).done
            time.sleep(0.3)
            return 0 < done == manager.status(started.download_id).done

        deadline = time.monotonic() + 30
        while not stalled():
            assert time.monotonic() < deadline, "the download never stalled"
        time.sleep(0.8)  # the interval ends: what it held back goes
        assert published[-1] == manager.status(started.download_id)
        assert 0 < published[-1].done < published[-1].total
        assert [p.done for p in published] == sorted(p.done for p in published)  # never an older status later
    finally:
        hub.slow_files.clear()
    done = manager.wait(started.download_id, timeout=30)
    assert done.state == "done" and published[-1] == done
    manager.close()


def test_a_download_stopped_with_its_node_is_resumed_when_it_starts_again(hub: FakeHub, tmp_path: Path,
                                                                          tiny_checkpoint: dict[str, bytes]) -> None:
    saved = SavedList(tmp_path / "downloads.json", SavedDownload, lambda d: d.download_id)
    hub.slow_files.add("config.json")  # the download is in flight when the node stops
    first = DownloadManager(publish_interval=0, saved=saved)
    running = first.start(REPO_ID)
    stopping = threading.Thread(target=first.close)
    stopping.start()
    deadline = time.monotonic() + 10
    while not first.closing:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    hub.slow_files.clear()  # the stalled read ends; the download sees the stop at its next chunk
    stopping.join(30)
    assert first.status(running.download_id).state == "cancelled"
    assert [d.download_id for d in saved.load()] == [running.download_id], "kept to resume"

    again = DownloadManager(publish_interval=0, saved=saved)
    (resumed,) = again.resume()
    assert resumed.download_id == running.download_id
    done = again.wait(resumed.download_id, timeout=30)
    assert done.state == "done", done.error
    assert_whole(Path(done.path or ""), tiny_checkpoint, MODEL_FILES | {n for n in tiny_checkpoint
                                                                        if n.endswith(".safetensors")})
    assert saved.load() == [], "a finished download leaves the file"
    again.close()


def test_a_download_the_user_cancels_is_not_resumed(hub: FakeHub, tmp_path: Path) -> None:
    saved = SavedList(tmp_path / "downloads.json", SavedDownload, lambda d: d.download_id)
    manager = DownloadManager(publish_interval=0, saved=saved)
    hub.slow_files.add("config.json")
    running = manager.start(REPO_ID)
    manager.cancel(running.download_id)
    hub.slow_files.clear()
    assert manager.wait(running.download_id, timeout=30).state == "cancelled"
    manager.close()
    assert saved.load() == [] and DownloadManager(saved=saved).resume() == []


def _partial_path(name: str, data: bytes) -> Path:
    remote = RemoteFile(name, len(data), hashlib.sha256(data).hexdigest(), None)
    return ModelStore().root / REPO_ID / INCOMPLETE_DIR / remote.partial_name


def test_a_node_runs_few_downloads_at_once_and_forgets_old_finished_ones(hub: FakeHub) -> None:
    manager = DownloadManager(publish_interval=0, max_running=1, keep_finished=2)
    hub.slow_files.add("config.json")  # the first download stays running
    first = manager.start(REPO_ID, layers=(0, 2))
    with pytest.raises(TooManyDownloads, match="1 downloads are running on this node.*try again"):
        manager.start(REPO_ID, layers=(2, 4))
    hub.slow_files.clear()
    manager.wait(first.download_id, timeout=30)
    finished = [first.download_id]
    for _ in range(3):
        finished.append(manager.wait(manager.start("nobody/missing").download_id, timeout=30).download_id)
    # starting the fourth forgot the first: at most 2 finished ones remembered, plus the one just started
    assert [s.download_id for s in manager.statuses()] == finished[1:]
    manager.close()


def test_the_cluster_state_forgets_the_oldest_finished_downloads() -> None:
    from ringlet.shared.state import KEEP_FINISHED_DOWNLOADS, DownloadProgressed, DownloadRecord, State, apply

    state = State()
    running = DownloadRecord(download_id="live", node_id="a", model="m", state="running")
    state = apply(state, DownloadProgressed(download=running))
    for n in range(KEEP_FINISHED_DOWNLOADS + 5):
        done = DownloadRecord(download_id=f"d{n}", node_id="a", model="m", state="done")
        state = apply(state, DownloadProgressed(download=done))
    assert len(state.downloads) == KEEP_FINISHED_DOWNLOADS + 1 and "live" in state.downloads
    assert "d0" not in state.downloads and f"d{KEEP_FINISHED_DOWNLOADS + 4}" in state.downloads


def test_a_split_gguf_model_is_fetched_whole(hub: FakeHub) -> None:
    parts = {f"big-Q4_K_M-{i:05d}-of-00003.gguf": b"GGUF" + bytes([i]) * 3000 for i in (1, 2, 3)}
    hub.repos["someone/big-GGUF"] = HubRepo({**parts, "big-Q8_0.gguf": b"GGUF" + b"8" * 9000})
    path = download_model("someone/big-GGUF:Q4_K_M")
    assert path.name == "big-Q4_K_M-00001-of-00003.gguf"
    assert fetched(hub) == set(parts)
    assert all((path.parent / name).read_bytes() == data for name, data in parts.items())
    del hub.repos["someone/big-GGUF"].files["big-Q4_K_M-00003-of-00003.gguf"]
    with pytest.raises(ModelLoadError, match="big-Q4_K_M-00003-of-00003.gguf are not in the repo"):
        download_model("someone/big-GGUF:Q4_K_M")
