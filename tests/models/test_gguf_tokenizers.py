"""SentencePiece vocabularies in GGUF files (Mistral, Llama 2, Gemma, Phi), as llama.cpp's converter writes them.

The vocabularies are trained here with sentencepiece itself, in the two shapes those models use: a space before the
text (Mistral, Llama 2, Phi) or none (Gemma). ringlet's tokenizer must equal transformers' GGUF tokenizer on every
string, and sentencepiece's own model on plain text.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece as spm
import transformers

from ringlet.models.gguf_loader import GGUFModel
from ringlet.models.tokenizer import StreamingDetokenizer, Tokenizer, gguf_metadata
from ringlet.shared.errors import ModelLoadError
from tests.support.tiny_gguf import write_tiny_gguf

PLAIN = ["Hello world", "two  spaces and three   here", "digits 1234567 and 3.14", "café naïve 東京 日本語 🙂🎉",
         "line one\nline two\n\nend", "trailing space ", "tabs\tand\tmore"]
# what transformers and llama.cpp treat alike but sentencepiece alone cannot know: special tokens in the text, and a
# leading space (Metaspace puts one mark, sentencepiece two)
WITH_SPECIALS = [*PLAIN, "<s>[INST] hi [/INST]", "call <tool> now</s>", " leading space", ""]
TEMPLATE = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
STYLES = {"mistral": ("llama", True), "gemma": ("gemma3", False)}  # architecture, space before the text


def train(space_before: bool) -> spm.SentencePieceProcessor:
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world", "123", "4567", "café",
             "naïve", "東京", "日本語", "🙂", "tokens"]
    lines = ["  ".join(rng.choice(words) for _ in range(10)) if i % 7 == 0 else
             " ".join(rng.choice(words) for _ in range(12)) for i in range(3000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, user_defined_symbols=["<tool>"], normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        add_dummy_prefix=space_before, minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def write_vocabulary(writer: gguf.GGUFWriter, sp: spm.SentencePieceProcessor, space_before: bool) -> None:
    """The keys llama.cpp's convert_hf_to_gguf.py writes for a SentencePiece vocabulary."""
    types = []
    for i in range(sp.vocab_size()):
        kind = (gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i) else
                gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.UNUSED if sp.is_unused(i) else
                gguf.TokenType.USER_DEFINED if sp.id_to_piece(i) == "<tool>" else gguf.TokenType.NORMAL)
        types.append(kind)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([sp.id_to_piece(i) for i in range(sp.vocab_size())])
    writer.add_token_scores([sp.get_score(i) for i in range(sp.vocab_size())])
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(space_before)
    writer.add_chat_template(TEMPLATE)


@pytest.fixture(scope="module", params=sorted(STYLES))
def style(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> tuple[spm.SentencePieceProcessor, Path, Tokenizer]:
    """(sentencepiece's model, the GGUF file, ringlet's tokenizer from it) for one style."""
    arch, space_before = STYLES[request.param]
    sp = train(space_before)
    path = tmp_path_factory.mktemp(request.param) / f"{request.param}.gguf"
    if arch == "llama":  # a whole model: the tokenizer as a runner gets it
        write_tiny_gguf(path, metadata=lambda writer: write_vocabulary(writer, sp, space_before))
        return sp, path, GGUFModel.open(path).tokenizer()
    writer = gguf.GGUFWriter(str(path), arch)  # an architecture ringlet does not run: its tokenizer alone
    write_vocabulary(writer, sp, space_before)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sp, path, Tokenizer.from_gguf_file(path, gguf_metadata(gguf.GGUFReader(path)))


def test_it_equals_transformers_gguf_tokenizer(style: tuple[spm.SentencePieceProcessor, Path, Tokenizer]) -> None:
    _, path, ours = style
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           local_files_only=True)
    for text in WITH_SPECIALS:
        for specials in (True, False):
            assert ours.encode(text, add_special_tokens=specials) == reference.encode(
                text, add_special_tokens=specials), (text, specials)
        ids = ours.encode(text)
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True), text


def test_plain_text_equals_sentencepiece(style: tuple[spm.SentencePieceProcessor, Path, Tokenizer]) -> None:
    sp, _, ours = style
    for text in PLAIN:
        assert ours.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert ours.encode(text) == [sp.bos_id(), *sp.encode(text)], text
        assert ours.decode(ours.encode(text)) == text


def test_names_and_template_come_from_the_metadata(style: tuple[spm.SentencePieceProcessor, Path, Tokenizer]) -> None:
    sp, _, ours = style
    assert ours.bos_token_id == sp.bos_id() and ours.eos_token_ids == [sp.eos_id()]
    assert ours.template_tokens == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    prompt = ours.apply_chat_template([{"role": "user", "content": "hi 🙂"}], add_generation_prompt=False)
    assert prompt == "<s>[user] hi 🙂</s>"
    ids = ours.encode(prompt, add_special_tokens=False)
    assert ids[0] == sp.bos_id() and ids[-1] == sp.eos_id() and ids.count(sp.bos_id()) == 1


def test_streamed_text_never_splits_a_character(style: tuple[spm.SentencePieceProcessor, Path, Tokenizer]) -> None:
    _, _, ours = style
    text = "café 東京 🙂🎉 done"
    stream = StreamingDetokenizer(ours)
    deltas = [stream.add_token(i) for i in ours.encode(text, add_special_tokens=False)] + [stream.finalize()]
    assert "".join(deltas) == text and all("\ufffd" not in d for d in deltas)


def test_a_vocabulary_transformers_cannot_convert_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "gemma1.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma")  # transformers reads Gemma 2 and 3 files, not the first Gemma's
    write_vocabulary(writer, train(False), False)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="gemma1.gguf: cannot build its 'llama' tokenizer from the GGUF metadata"):
        Tokenizer.from_gguf_file(path, gguf_metadata(gguf.GGUFReader(path)))
