"""Random-weight embedding models shaped like Qwen3-Embedding, built with transformers' own Qwen3 classes: the bare
backbone saved as sentence-transformers saves it (`embed_tokens.weight`, `layers.N....`, `norm.weight`, no lm_head),
the embedded model's tokenizer with Qwen3-Embedding's end-of-text token appended to every input, and the
sentence-transformers pooling files; and the reference embeddings transformers computes for them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from tokenizers import processors

from ringlet.models.embedded import embedded_model_path
from ringlet.models.gguf_loader import GGUFModel
from ringlet.models.random_checkpoint import synthetic_tokenizer

END_OF_TEXT = "<|endoftext|>"  # the embedded tokenizer's; Qwen3-Embedding appends its own to every input
# a tiny Qwen3 (per-head q/k norms, grouped-query attention) over the embedded tokenizer's vocabulary
CONFIG = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
          "rope_theta": 1_000_000.0}


def _pooling_config(mode: str, hidden_size: int) -> dict[str, object]:
    flags = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
    return {"word_embedding_dimension": hidden_size, **{f"pooling_mode_{flag}": flag == mode for flag in flags},
            "include_prompt": True}


def write_tokenizer(directory: Path, append_end_of_text: bool = True) -> None:
    """The embedded model's tokenizer as tokenizer.json; with `append_end_of_text`, every input ends in <|endoftext|>
    (Qwen3-Embedding's post-processor)."""
    tokenizer = GGUFModel(embedded_model_path()).tokenizer()
    backend = tokenizer.backend
    if append_end_of_text:
        backend.post_processor = processors.TemplateProcessing(
            single=f"$A {END_OF_TEXT}", special_tokens=[(END_OF_TEXT, backend.token_to_id(END_OF_TEXT))])
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": END_OF_TEXT, "pad_token": END_OF_TEXT,
        "padding_side": "left"}))


def embedding_checkpoint(directory: Path, mode: str = "lasttoken", normalize: bool = True, tied: bool = True,
                         seed: int = 0, max_shard_size: str = "5GB", vocab_size: int | None = None) -> Path:
    """A random Qwen3 backbone saved in `directory` with sentence-transformers pooling by `mode` (lasttoken,
    mean_tokens, cls_token) and, with `normalize`, a Normalize module. `tied` False: the config says untied yet no
    lm_head is saved (as Qwen3-Embedding-8B ships). A `max_shard_size` below the weights' size splits them over
    several files and an index. `vocab_size`: a synthetic word tokenizer of that many tokens (t0 t1 ...) in place of
    the embedded model's, where that is not installed (the GPU machine)."""
    directory.mkdir(parents=True, exist_ok=True)
    if vocab_size is None:
        write_tokenizer(directory)
        vocab_size = len(json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"])
    else:
        synthetic_tokenizer(vocab_size).backend.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    config = transformers.Qwen3Config(vocab_size=vocab_size, tie_word_embeddings=tied, **CONFIG)
    torch.manual_seed(seed)
    model = transformers.Qwen3Model(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):  # not all ones: a pooled norm that skipped its scale must show
                parameter.copy_(1 + 0.3 * torch.randn_like(parameter))
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (directory / "2_Normalize").mkdir(exist_ok=True)
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(_pooling_config(mode, config.hidden_size)))
    return directory


def reference_embeddings(directory: Path, texts: list[str], mode: str = "lasttoken", normalize: bool = True,
                         dimensions: int | None = None) -> torch.Tensor:
    """What transformers computes for `texts`, one at a time (no padding): the backbone's last hidden states,
    pooled by `mode`, cut to `dimensions`, L2-normalised with `normalize`; fp32 [N, H]."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    return reference_from_ids(directory, [tokenizer(text)["input_ids"] for text in texts], mode, normalize, dimensions)


def reference_from_ids(directory: Path, inputs: list[list[int]], mode: str = "lasttoken", normalize: bool = True,
                       dimensions: int | None = None) -> torch.Tensor:
    """`reference_embeddings` of inputs given as token ids."""
    model = transformers.Qwen3Model.from_pretrained(directory, torch_dtype=torch.float32).eval()
    vectors = []
    with torch.no_grad():
        for ids in inputs:
            hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
            pooled = {"lasttoken": hidden[-1], "mean_tokens": hidden.mean(dim=0), "cls_token": hidden[0]}[mode]
            vectors.append(pooled)
    stacked = torch.stack(vectors)
    if dimensions is not None:
        stacked = stacked[:, :dimensions]
    return F.normalize(stacked, p=2, dim=-1) if normalize else stacked


def token_ids(directory: Path, text: str) -> list[int]:
    """The ids transformers' tokenizer of the checkpoint gives `text` (end-of-text included)."""
    return list(transformers.AutoTokenizer.from_pretrained(directory)(text)["input_ids"])
