"""Second names of models (`ringlet cp`, /api/copy): compared as Ollama compares names, replaced by a copy to the same
name, bounded, and forgotten with their model."""

from __future__ import annotations

from pathlib import Path

import pytest

from ringlet.models.aliases import ModelAliases
from ringlet.shared.errors import ModelLoadError


def test_names_compare_as_ollamas_and_a_copy_to_a_name_replaces_it(tmp_path: Path) -> None:
    names = ModelAliases(tmp_path / "store" / "aliases.json")
    assert names.get("mine") is None and names.remove("mine") is None and names.remove_pointing_to("org/m") == []
    names.add("registry.ollama.ai/library/Mine", "org/m:Q4_K_M")
    for spelling in ("mine", "MINE:latest", "library/mine", "Mine:latest"):
        found = names.get(spelling)
        assert found is not None and found.target == "org/m:Q4_K_M", spelling
    names.add("mine", "org/other")
    assert [(a.name, a.target) for a in names.all()] == [("mine:latest", "org/other")]
    names.add("team/mine:v2", "org/m:Q8_0")
    assert names.get("team/mine") is None, "another tag is another name"
    assert [a.name for a in names.remove_pointing_to("Org/M")] == ["team/mine:v2"], "every file of the repo"
    assert [a.name for a in names.all()] == ["mine:latest"]


def test_a_name_that_cannot_be_one_or_one_too_many_is_refused(tmp_path: Path) -> None:
    names = ModelAliases(tmp_path / "aliases.json", most=2)
    for bad in ("../up", "a b", "x:../../etc", "/abs/path"):
        with pytest.raises(ModelLoadError, match="cannot be a model name"):
            names.add(bad, "org/m")
    with pytest.raises(ModelLoadError, match="own name"):
        names.add("org/m:latest", "org/m")
    names.add("one", "org/m")
    names.add("two", "org/m")
    names.add("two", "org/n")  # replacing one is no new name
    with pytest.raises(ModelLoadError, match="2 model names are kept already"):
        names.add("three", "org/m")
