"""GGUF loading: the embedded SmolLM2 file against transformers, and tiny files written here."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from ringlet.models.config import ModelArgs
from ringlet.models.embedded import embedded_model_path
from ringlet.models.gguf_loader import GGUFModel, gguf_size
from ringlet.models.loader import read_model_config
from ringlet.shared.errors import ModelLoadError
from tests.support.tiny_gguf import HEAD_DIM, HIDDEN, LAYER_WEIGHTS, LAYERS, write_tiny_gguf

# ---- the embedded model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded() -> GGUFModel:
    return GGUFModel.open(embedded_model_path())


@pytest.fixture(scope="module")
def transformers_model():  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    path = embedded_model_path()
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()


@pytest.fixture(scope="module")
def transformers_state_dict(transformers_model) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {k: v.float() for k, v in transformers_model.state_dict().items()}


@pytest.mark.slow
@torch.no_grad()
def test_embedded_logits_match_transformers(transformers_model) -> None:  # type: ignore[no-untyped-def]
    from ringlet.models.loader import load_stage

    stage = load_stage(None)
    ids = torch.tensor([stage.tokenizer.encode("The capital of France is Paris, and the capital of Italy is")])
    cache = stage.model.make_cache(1, 64)
    ours = stage.model(ids, cache, 0)
    torch.testing.assert_close(ours, transformers_model(ids).logits, atol=2e-4, rtol=1e-4)
    nxt = ours[:, -1:].argmax(-1)
    step = stage.model(nxt, cache, ids.shape[1])
    full = transformers_model(torch.cat([ids, nxt], dim=1)).logits[:, -1:]
    torch.testing.assert_close(step, full, atol=2e-4, rtol=1e-4)


def test_embedded_config(embedded: GGUFModel) -> None:
    c = embedded.config
    assert c["model_type"] == "llama"
    assert (c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"]) == (30, 576, 1536)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["vocab_size"]) == (9, 3, 49152)
    assert c["tie_word_embeddings"] is True
    assert c["rope_theta"] == 100000.0
    assert c["max_position_embeddings"] == 8192
    assert c["rms_norm_eps"] == pytest.approx(1e-5)
    assert c["bos_token_id"] == 1 and c["eos_token_id"] == [2]
    assert "rope_scaling" not in c
    args = ModelArgs.from_dict(c)
    assert args.head_dim == 64 and args.eos_token_id == [2]


@pytest.mark.slow
def test_embedded_weights_match_transformers(
    embedded: GGUFModel, transformers_state_dict: dict[str, torch.Tensor]
) -> None:
    ours = embedded.load_state_dict(0, 30)
    reference = dict(transformers_state_dict)
    # transformers materialises the tied lm_head; the GGUF has none and we don't invent one.
    torch.testing.assert_close(reference.pop("lm_head.weight"), ours["model.embed_tokens.weight"], rtol=0, atol=0)
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        assert ours[name].dtype == torch.float32
        # Same arithmetic as gguf.quants, so normally bit-identical; torch.equal is the fast path.
        if not torch.equal(ours[name], tensor):
            torch.testing.assert_close(ours[name], tensor, rtol=1e-6, atol=1e-7, msg=f"{name} differs")


def test_embedded_partial_ranges(embedded: GGUFModel, monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[str] = []
    original = GGUFModel._read_tensor

    def spy(self: GGUFModel, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        read.append(name)
        return original(self, name, dtype)

    monkeypatch.setattr(GGUFModel, "_read_tensor", spy)

    first = embedded.load_state_dict(0, 15)
    assert "model.embed_tokens.weight" in first
    assert "model.norm.weight" not in first and "lm_head.weight" not in first
    assert {int(k.split(".")[2]) for k in first if k.startswith("model.layers.")} == set(range(15))
    assert len(read) == 1 + 15 * 9
    assert all(not n.startswith("blk.") or int(n.split(".")[1]) < 15 for n in read)
    assert "output_norm.weight" not in read

    read.clear()
    last = embedded.load_state_dict(15, 30, dtype=torch.bfloat16)
    # tied embeddings: the last stage gets embed_tokens to use as its lm_head
    assert {"model.embed_tokens.weight", "model.norm.weight"} <= set(last)
    assert "lm_head.weight" not in last
    assert {int(k.split(".")[2]) for k in last if k.startswith("model.layers.")} == set(range(15, 30))
    assert all(not n.startswith("blk.") or int(n.split(".")[1]) >= 15 for n in read)
    assert all(t.dtype == torch.bfloat16 for t in last.values())

    for bad in [(0, 31), (10, 10), (-1, 5)]:
        with pytest.raises(ModelLoadError, match="layer range"):
            embedded.load_state_dict(*bad)


# ---- tiny files written here --------------------------------------------------------------

def quantisation_bound(w: np.ndarray, qtype: Q) -> float:
    """Largest error each type allows, from the block maxima (ggml's quantize_row_* definitions)."""
    if qtype == Q.F32:
        return 0.0
    if qtype in (Q.F16, Q.BF16):  # half an ulp of the largest value
        return float(np.abs(w).max()) * (2**-11 if qtype == Q.F16 else 2**-8)
    blocks = w.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1)
    if qtype == Q.Q8_0:
        step = amax / 127
    elif qtype == Q.Q4_0:  # d = max / -8; a value opposite the max can clip by a full step
        step = 2 * amax / 8
    else:  # Q4_1: (max - min) / 15
        step = (blocks.max(axis=1) - blocks.min(axis=1)) / 15
    # half a step of rounding, plus what storing the scale (and min) as fp16 can add
    return float((step / 2 + amax * 2**-8).max())


def test_tiny_llama_dequantises_every_type_and_unpermutes(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    originals = write_tiny_gguf(path)
    model = GGUFModel.open(path)
    assert model.config["tie_word_embeddings"] is False
    assert model.config["eos_token_id"] == [7, 9]
    assert model.config["rope_theta"] == 500000.0
    state = model.load_state_dict(0, LAYERS)
    assert set(state) == set(originals)

    types = {"model.embed_tokens.weight": Q.Q8_0, "model.norm.weight": Q.F32, "lm_head.weight": Q.Q4_0}
    for i in range(LAYERS):
        types.update({f"model.layers.{i}.{hf}": spec[2 + i] for hf, spec in LAYER_WEIGHTS.items()})
    seen_types = set()
    for name, original in originals.items():
        qtype = types[name]
        seen_types.add(qtype)
        error = float((state[name] - torch.from_numpy(original)).abs().max())
        bound = quantisation_bound(original, qtype)
        assert error <= bound, f"{name} ({qtype.name}): error {error} > {bound}"
        if qtype != Q.F32:  # lossy types: must actually be the quantised values, not a copy
            assert error > 0
    assert seen_types == {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1}

    # exact: an F32 q_proj comes back bit for bit, which needs the permutation undone
    q1 = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(state[q1], torch.from_numpy(originals[q1]))


def test_tiny_qwen2_has_biases_and_no_permutation(tmp_path: Path) -> None:
    path = tmp_path / "qwen2.gguf"
    originals = write_tiny_gguf(path, "qwen2", tied=True)
    model = GGUFModel.open(path)
    assert model.config["model_type"] == "qwen2"
    assert model.config["attention_bias"] is True
    assert model.config["tie_word_embeddings"] is True
    args = ModelArgs.from_dict(model.config)
    assert args.attention_bias and not args.qk_norm
    state = model.load_state_dict(1, 2)
    for proj in "qkv":
        name = f"model.layers.1.self_attn.{proj}_proj.bias"
        assert torch.equal(state[name], torch.from_numpy(originals[name]))
    q1 = "model.layers.1.self_attn.q_proj.weight"  # F32 and not permuted in the file
    assert torch.equal(state[q1], torch.from_numpy(originals[q1]))
    assert "model.embed_tokens.weight" in state  # tied: the last stage's lm_head


def test_tiny_qwen3_has_qk_norms(tmp_path: Path) -> None:
    path = tmp_path / "qwen3.gguf"
    originals = write_tiny_gguf(path, "qwen3")
    model = GGUFModel.open(path)
    assert model.config["model_type"] == "qwen3" and model.config["attention_bias"] is False
    assert ModelArgs.from_dict(model.config).qk_norm
    state = model.load_state_dict(0, 1)
    for name in ("model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"):
        assert torch.equal(state[name], torch.from_numpy(originals[name]))
    assert not any(k.startswith("model.layers.1.") for k in state)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path: Path) -> None:
    # what convert_hf_to_gguf.py writes for Llama 3.2 (factor 32, low 1, high 4, original 8192)
    theta, factor, old_context = 500000.0, 32.0, 8192
    freqs = 1.0 / (theta ** (np.arange(0, HEAD_DIM, 2, dtype=np.float32) / HEAD_DIM))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / 4:
            factors.append(1.0)
        elif wavelen > old_context / 1:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - 1) / (4 - 1)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    rope_freqs = np.array(factors, dtype=np.float32)
    path = tmp_path / "llama3.gguf"
    write_tiny_gguf(path, extra_tensors={"rope_freqs.weight": (rope_freqs, Q.F32)})
    scaling = GGUFModel.open(path).config["rope_scaling"]
    assert scaling["rope_type"] == "llama3"
    assert scaling["factor"] == pytest.approx(factor)
    assert scaling["original_max_position_embeddings"] == old_context

    odd = tmp_path / "odd_rope.gguf"
    write_tiny_gguf(odd, extra_tensors={"rope_freqs.weight": (rope_freqs[::-1].copy(), Q.F32)})
    with pytest.raises(ModelLoadError, match="rope_freqs"):
        GGUFModel.open(odd)


def test_unknown_architecture_names_supported_ones(tmp_path: Path) -> None:
    path = tmp_path / "falcon.gguf"
    write_tiny_gguf(path, "falcon")
    with pytest.raises(ModelLoadError, match="falcon") as info:
        GGUFModel.open(path)
    for arch in ("llama", "mistral", "qwen2", "qwen3"):
        assert arch in str(info.value)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    path = tmp_path / "missing.gguf"
    write_tiny_gguf(path, skip=("blk.1.ffn_up.weight",))
    model = GGUFModel.open(path)
    assert "model.layers.0.mlp.up_proj.weight" in model.load_state_dict(0, 1)
    with pytest.raises(ModelLoadError, match=r"missing.*blk\.1\.ffn_up\.weight") as info:
        model.load_state_dict(0, 2)
    assert str(path) in str(info.value)


def test_unsupported_quant_type_is_named(tmp_path: Path) -> None:
    path = tmp_path / "q8_1.gguf"
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    raw = np.zeros((4, block_bytes * HIDDEN // block_size), dtype=np.uint8)
    write_tiny_gguf(path, extra_tensors={"blk.0.odd.weight": (raw, Q.Q8_1)})
    model = GGUFModel.open(path)
    with pytest.raises(ModelLoadError, match="Q8_1"):
        model._read_tensor("blk.0.odd.weight")


@pytest.mark.parametrize("damage", ["truncated", "bad_magic", "empty", "header_only"])
def test_corrupt_files_raise_model_load_error(tmp_path: Path, damage: str) -> None:
    good = tmp_path / "good.gguf"
    write_tiny_gguf(good)
    data = good.read_bytes()
    bad = tmp_path / f"{damage}.gguf"
    bad.write_bytes({
        "truncated": data[: len(data) // 2],
        "bad_magic": b"GGML" + data[4:],
        "empty": b"",
        "header_only": data[:40],
    }[damage])
    with pytest.raises(ModelLoadError) as info:
        GGUFModel.open(bad)
    assert str(bad) in str(info.value)


def test_missing_file_raises_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot read"):
        GGUFModel.open(tmp_path / "nope.gguf")


def test_tiny_file_without_tokenizer_says_so(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    with pytest.raises(ModelLoadError, match="the GGUF file has no tokenizer"):
        GGUFModel.open(path).tokenizer()


# ---- split files ---------------------------------------------------------------------------


def _split_model(tmp_path: Path) -> tuple[Path, list[Path]]:
    whole = tmp_path / "whole" / "tiny.gguf"
    whole.parent.mkdir()
    write_tiny_gguf(whole)
    (tmp_path / "split").mkdir()
    write_tiny_gguf(tmp_path / "split" / "tiny.gguf", split_max_tensors=7)
    return whole, sorted((tmp_path / "split").glob("*.gguf"))


def test_a_split_model_loads_from_any_of_its_files_as_the_whole_file(tmp_path: Path) -> None:
    whole, parts = _split_model(tmp_path)
    assert [p.name for p in parts] == [f"tiny-{i:05d}-of-{len(parts):05d}.gguf" for i in range(1, len(parts) + 1)]
    assert len(parts) >= 3
    reference = GGUFModel.open(whole)
    expected = reference.load_state_dict(0, LAYERS)
    for part in (parts[0], parts[-1]):
        model = GGUFModel.open(part)
        assert model.path == parts[0] and model.config == reference.config
        weights = model.load_state_dict(0, LAYERS)
        assert weights.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(weights[name], tensor), name
    assert gguf_size(parts[1]) == sum(p.stat().st_size for p in parts) > whole.stat().st_size
    assert read_model_config(parts[0])[1] == ModelArgs.from_dict(reference.config)


def test_a_split_model_with_a_missing_part_names_it(tmp_path: Path) -> None:
    _, parts = _split_model(tmp_path)
    parts[1].unlink()
    with pytest.raises(ModelLoadError, match=f"{parts[1].name} is missing from"):
        GGUFModel.open(parts[0])


def test_a_renamed_part_of_a_split_model_says_how_parts_are_named(tmp_path: Path) -> None:
    _, parts = _split_model(tmp_path)
    renamed = parts[0].rename(parts[0].with_name("tiny.gguf"))
    with pytest.raises(ModelLoadError, match="does not say which .*NAME-00001-of-"):
        GGUFModel.open(renamed)


def test_a_gguf_file_is_known_by_its_first_bytes_not_its_name(tmp_path: Path) -> None:
    blob = tmp_path / "sha256-0123"
    write_tiny_gguf(blob)
    assert read_model_config(blob)[1].num_hidden_layers == LAYERS
    other = tmp_path / "weights.bin"
    other.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(ModelLoadError, match="neither a model directory nor a GGUF file"):
        read_model_config(other)


# ---- the metadata reader -------------------------------------------------------------------


def _metadata_file(path: Path) -> Path:
    """A GGUF file of one tensor and metadata of every kind of array, two of them empty. gguf-py writes no empty
    array (llama.cpp's writer does): each is written with one element, cut out of the bytes afterwards, and the
    string after them lengthened by as many bytes, so that the header keeps its size."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_array("test.strings", ["", "a", " spaced ", "数字 123", "🙂 emoji", "é" * 300])
    writer.add_array("test.int32", [0, -1, 2**31 - 1, 7])
    writer.add_array("test.float32", [0.5, -2.25, 1e-30])
    writer.add_array("test.bools", [True, False, True])
    writer.add_array("test.nested", [[1, 2], [3], [4, 5, 6]])
    writer.add_uint64("test.uint64", 2**40)
    writer.add_array("test.no_strings", ["x"])
    writer.add_array("test.no_numbers", [5])
    writer.add_string("test.string", "plain")
    writer.add_tensor("w", np.ones((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    array, string, int32 = struct.pack("<I", 9), struct.pack("<I", 8), struct.pack("<I", 5)
    data = path.read_bytes()
    for before, after in [
        (b"test.no_strings" + array + string + struct.pack("<QQ", 1, 1) + b"x",
         b"test.no_strings" + array + string + struct.pack("<Q", 0)),
        (b"test.no_numbers" + array + int32 + struct.pack("<Qi", 1, 5),
         b"test.no_numbers" + array + int32 + struct.pack("<Q", 0)),
        (b"test.string" + string + struct.pack("<Q", 5) + b"plain",
         b"test.string" + string + struct.pack("<Q", 5 + 13) + b"plain" + b"-" * 13),
    ]:
        assert data.count(before) == 1, before
        data = data.replace(before, after)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("which", ["embedded", "every kind of array"])
def test_the_reader_parses_metadata_as_gguf_py_does(tmp_path: Path, which: str) -> None:
    """ringlet's reader reads arrays in one pass: its fields (offsets, parts, types, contents) and tensors are
    gguf-py's."""
    from ringlet.models.gguf_loader import _Reader

    path = embedded_model_path() if which == "embedded" else _metadata_file(tmp_path / "metadata.gguf")
    ours, theirs = _Reader(path), gguf.GGUFReader(path)
    assert list(ours.fields) == list(theirs.fields)
    for name, field in theirs.fields.items():
        mine = ours.fields[name]
        assert (mine.offset, mine.name, mine.data, mine.types) == (field.offset, field.name, field.data, field.types)
        assert len(mine.parts) == len(field.parts), name
        assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(mine.parts, field.parts)), name
        assert mine.contents() == field.contents(), name
    assert [(t.name, t.data_offset, t.n_bytes) for t in ours.tensors] == [
        (t.name, t.data_offset, t.n_bytes) for t in theirs.tensors]
    if which != "embedded":
        assert ours.fields["test.strings"].contents()[3:5] == ["数字 123", "🙂 emoji"]
        assert ours.fields["test.no_strings"].contents() == ours.fields["test.no_numbers"].contents() == []
        assert ours.fields["test.string"].contents() == "plain" + "-" * 13


def test_a_file_cut_inside_its_vocabulary_raises_model_load_error(tmp_path: Path) -> None:
    data = _metadata_file(tmp_path / "metadata.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:data.index("é".encode()) + 100])
    with pytest.raises(ModelLoadError, match="truncated or corrupt") as info:
        GGUFModel.open(cut)
    assert str(cut) in str(info.value)
