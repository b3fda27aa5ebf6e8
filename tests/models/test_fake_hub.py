"""The fake hub speaks the protocol faithfully enough for huggingface_hub's own download path too."""

from __future__ import annotations

import hashlib
from pathlib import Path

from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

from tests.support.fake_hub import FakeHub
from tests.support.hub import REPO_ID


def test_huggingface_hub_downloads_from_the_fake_hub(hub: FakeHub, tiny_checkpoint: dict[str, bytes],
                                                      tmp_path: Path) -> None:
    name = "model-00001-of-00007.safetensors"
    commit = hub.repos[REPO_ID].commit
    meta = get_hf_file_metadata(hf_hub_url(REPO_ID, name, endpoint=hub.url), endpoint=hub.url)
    assert (meta.commit_hash, meta.size) == (commit, len(tiny_checkpoint[name]))
    assert meta.etag == hashlib.sha256(tiny_checkpoint[name]).hexdigest()  # X-Linked-Etag of an LFS file
    for file in (name, "config.json"):
        path = hf_hub_download(REPO_ID, file, endpoint=hub.url, cache_dir=tmp_path / "hf-cache")
        assert Path(path).read_bytes() == tiny_checkpoint[file]
    assert any(r.method == "HEAD" for r in hub.requests)
