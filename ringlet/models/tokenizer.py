"""Tokenizer (HF `tokenizers`, Rust) and chat template (sandboxed jinja2), from a HF directory or GGUF metadata.

    tok = Tokenizer.from_hf_dir(path)            # tokenizer.json + tokenizer_config.json
    tok = GGUFModel.open(path).tokenizer()       # tokenizer.ggml.* metadata (SentencePiece through transformers)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    ids = tok.encode(prompt, add_special_tokens=False)

`StreamingDetokenizer` turns generated ids into text deltas that never split a UTF-8 character.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from ringlet.shared.errors import ModelLoadError

log = logging.getLogger(__name__)

# Used when a model ships no chat template at all.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# llama.cpp token types (llama_token_type / gguf.TokenType)
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# Pre-tokenizer splits, as llama.cpp applies them per `tokenizer.ggml.pre` (llama-vocab.cpp) and as
# the models' own tokenizer.json files do.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"}
_QWEN2_PRE = {"qwen2", "deepseek-r1-qwen"}
# llama.cpp: each digit alone ("\p{N}"), then the GPT-2 regex; SmolLM2's tokenizer.json says the same
# with Digits(individual_digits=True) before ByteLevel.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
_GPT2_PRE = {"default", "gpt-2", "gpt2"}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of every byte-level BPE vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = _bytes_to_unicode()
_BYTE_ALPHABET = frozenset(_BYTE_TO_CHAR.values())


class Tokenizer:
    """Encode/decode text and render chat templates; a thin layer over a `tokenizers.Tokenizer`."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        chat_template: str | None = None,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
        template_tokens: Mapping[str, str] | None = None,
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token_id = bos_token_id
        self.eos_token_ids: list[int] = list(dict.fromkeys(eos_token_ids))
        # bos_token, eos_token, ... as strings: chat templates refer to them by name.
        self.template_tokens: dict[str, str] = dict(template_tokens or {})

    # ---- construction ---------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """tokenizer.json, plus the chat template and special tokens of tokenizer_config.json et al."""
        root = Path(path)
        tokenizer_file = root / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelLoadError(f"{root}: no tokenizer.json (only fast-tokenizer directories are supported)")
        try:
            backend = BackendTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust side raises a bare Exception for any parse error
            raise ModelLoadError(f"{tokenizer_file}: cannot parse ({e})") from e
        config = _read_json(root / "tokenizer_config.json")

        template: Any = config.get("chat_template")
        if (root / "chat_template.jinja").is_file():
            template = (root / "chat_template.jinja").read_text(encoding="utf-8")
        elif (root / "chat_template.json").is_file():
            template = _read_json(root / "chat_template.json").get("chat_template", template)
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))

        template_tokens = {
            name: content
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (content := _token_content(config.get(name))) is not None
        }
        bos, eos_token = template_tokens.get("bos_token"), template_tokens.get("eos_token")
        bos_id = backend.token_to_id(bos) if bos else None
        eos_id = backend.token_to_id(eos_token) if eos_token else None
        eos_ids = [] if eos_id is None else [eos_id]
        # Instruct models often stop on several tokens (Llama 3: <|eot_id|>, <|eom_id|>); only the
        # model's config files list them all.
        for name in ("generation_config.json", "config.json"):
            eos = _read_json(root / name).get("eos_token_id")
            eos_ids += [eos] if isinstance(eos, int) else list(eos or [])
        return cls(
            backend, chat_template=template, bos_token_id=bos_id, eos_token_ids=eos_ids,
            template_tokens=template_tokens,
        )

    @classmethod
    def from_gguf_file(cls, path: Path, meta: Mapping[str, Any]) -> Tokenizer:
        """A GGUF file's tokenizer, `meta` being its `tokenizer.*` metadata: byte-level BPE ('gpt2': Llama 3, Qwen,
        SmolLM, Mistral Nemo) is rebuilt here, as llama.cpp splits its text; SentencePiece ('llama': Llama 2,
        Mistral, Gemma, Phi) and Unigram ('t5') vocabularies through transformers' GGUF conversion."""
        kind = meta.get("tokenizer.ggml.model")
        if kind == "gpt2":
            return cls.from_gguf(meta, source=str(path))
        if kind is None or not meta.get("tokenizer.ggml.tokens"):
            raise ModelLoadError(f"{path}: the GGUF file has no tokenizer (no tokenizer.ggml.model and tokens)")
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ModelLoadError(f"{path}: its {kind!r} tokenizer is read through "
                                 "transformers, which is not installed: pip install transformers") from None
        try:
            converted = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        except Exception as e:  # anything transformers' conversion meets in a file it cannot read
            raise ModelLoadError(f"{path}: cannot build its {kind!r} tokenizer from the "
                                 f"GGUF metadata ({type(e).__name__}: {e})") from e
        tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
        return cls(converted.backend_tokenizer, **_gguf_special_tokens(meta, tokens))

    @classmethod
    def from_gguf(cls, reader_or_metadata: Any, source: str = "GGUF file") -> Tokenizer:
        """A byte-level BPE vocabulary from llama.cpp's tokenizer metadata: a `gguf.GGUFReader`, or a dict of
        `tokenizer.*` keys (`from_gguf_file` reads the other kinds)."""
        meta: Mapping[str, Any] = (
            reader_or_metadata if isinstance(reader_or_metadata, Mapping) else gguf_metadata(reader_or_metadata)
        )
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ModelLoadError(f"{source}: tokenizer model {kind!r} is not byte-level BPE ('gpt2')")
        tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
        merges: list[str] = list(meta.get("tokenizer.ggml.merges") or [])
        if not tokens or not merges:
            raise ModelLoadError(f"{source}: GGUF tokenizer metadata has no tokens or no merges")
        types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        if len(types) != len(tokens):
            raise ModelLoadError(f"{source}: {len(tokens)} tokens but {len(types)} token types")
        pre = str(meta.get("tokenizer.ggml.pre", "default"))

        # Control/user-defined tokens are matched whole in raw text, so they stay as spelled; a normal
        # token outside the byte alphabet (rare, older converters) is re-spelled in it.
        vocab: dict[str, int] = {}
        for i, (token, token_type) in enumerate(zip(tokens, types, strict=True)):
            added = token_type in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
            if not added and not set(token) <= _BYTE_ALPHABET:
                token = "".join(_BYTE_TO_CHAR[b] for b in token.encode("utf-8"))
            vocab.setdefault(token, i)
        merge_pairs = [_merge_pair(m, source) for m in merges]

        backend = BackendTokenizer(models.BPE(vocab, merge_pairs, ignore_merges=pre in _LLAMA3_PRE))
        _set_pre_tokenizer(backend, pre, source)
        backend.decoder = decoders.ByteLevel()

        named_ids = _gguf_named_ids(meta, len(tokens))
        special_ids = {i for i, t in enumerate(types) if t == _TOKEN_CONTROL} | {
            i for i in named_ids.values() if i is not None
        }
        backend.add_special_tokens(
            [AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special_ids)]
        )
        user_defined = [i for i, t in enumerate(types) if t == _TOKEN_USER_DEFINED and i not in special_ids]
        backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user_defined])

        bos_id = named_ids["bos"]
        # llama.cpp adds BOS for Llama 3 vocabularies unless the file says otherwise.
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", pre in _LLAMA3_PRE))
        if add_bos and bos_id is not None:
            bos = tokens[bos_id]
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
            )
        return cls(backend, **_gguf_special_tokens(meta, tokens))

    # ---- text <-> ids ---------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Special tokens written in `text` (like `<|im_start|>`) always map to their ids;
        `add_special_tokens` only controls the BOS the model's post-processor adds."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- chat -----------------------------------------------------------------------------

    @cached_property
    def _compiled_template(self) -> jinja2.Template:
        return _jinja_env().from_string(self.chat_template or DEFAULT_CHAT_TEMPLATE)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render like transformers' apply_chat_template(tokenize=False); extra kwargs (tools,
        enable_thinking, ...) reach the template. A template's raise_exception becomes ValueError."""
        budget = _RenderBudget(time.monotonic() + TEMPLATE_MAX_S)
        bound = _BUDGET.set(budget)
        try:
            pieces = self._compiled_template.generate(
                messages=messages, add_generation_prompt=add_generation_prompt,
                **{"tools": None, "documents": None, **self.template_tokens, **kwargs},
            )
            rendered: list[str] = []
            for piece in pieces:
                budget.spend(0, len(piece))
                rendered.append(piece)
            return "".join(rendered)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template failed: {e}") from e
        except RecursionError:
            raise ValueError("chat template failed: it recursed without end; the model's chat template is "
                             "broken") from None
        except Exception as e:  # the template is the model's code: whatever it raises fails this request
            raise ValueError(f"chat template failed: {type(e).__name__}: {e}") from e
        finally:
            _BUDGET.reset(bound)


class SupportsDecode(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class StreamingDetokenizer:
    """Text deltas from ids one at a time, never ending mid UTF-8 character.

    As vLLM/mlx-lm do, it decodes a short window of ids: those of the last delta (for context) and
    those not yet emitted. The delta is decode(window) minus decode(emitted part of the window), so
    spaces that decoders only produce in context come out right. After each delta the window
    slides forward, so a step costs O(window), not O(history).
    """

    def __init__(self, tokenizer: SupportsDecode, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._read_offset = 0  # self._ids[:self._read_offset] are already emitted
        self._prefix_text = ""  # their decoded text

    def add_token(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip_special)
        # A trailing U+FFFD is an incomplete UTF-8 sequence; wait for the bytes that complete it.
        if len(text) <= len(self._prefix_text) or text.endswith("\ufffd"):
            return ""
        delta = text[len(self._prefix_text):]
        # Slide: the new window starts at the old read offset, so the next decode keeps context.
        self._ids = self._ids[self._read_offset:]
        self._read_offset = len(self._ids)
        self._prefix_text = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip_special)
        return delta

    def finalize(self) -> str:
        """Whatever is still held back (an incomplete character at the very end comes out as U+FFFD)."""
        text = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip_special)
        delta = text[len(self._prefix_text):]
        self._ids, self._read_offset, self._prefix_text = [], 0, ""
        return delta


def gguf_metadata(reader: Any) -> dict[str, Any]:
    """The `tokenizer.*` metadata of a gguf.GGUFReader as plain Python values."""
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}


def _gguf_named_ids(meta: Mapping[str, Any], vocab_size: int) -> dict[str, int | None]:
    """The ids the metadata names (`tokenizer.ggml.bos_token_id`...), None where absent or outside the vocabulary."""
    def token_id(key: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}_token_id")
        return int(value) if value is not None and 0 <= int(value) < vocab_size else None

    return {key: token_id(key) for key in ("bos", "eos", "eot", "eom", "unknown", "padding")}


def _gguf_special_tokens(meta: Mapping[str, Any], tokens: list[str]) -> dict[str, Any]:
    """The chat template, BOS, the ids that end a turn, and the tokens a chat template names, as `Tokenizer` takes
    them."""
    named_ids = _gguf_named_ids(meta, len(tokens))
    template_names = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}
    return {
        "chat_template": meta.get("tokenizer.chat_template"),
        "bos_token_id": named_ids["bos"],
        "eos_token_ids": [tid for key in ("eos", "eot", "eom") if (tid := named_ids[key]) is not None],
        "template_tokens": {name: tokens[tid] for name, key in template_names.items()
                            if (tid := named_ids[key]) is not None},
    }


def _merge_pair(merge: str, source: str) -> tuple[str, str]:
    left, space, right = merge.partition(" ")
    if not (left and space and right):
        raise ModelLoadError(f"{source}: malformed BPE merge {merge!r} (expected two tokens and a space)")
    return left, right


def _set_pre_tokenizer(backend: BackendTokenizer, pre: str, source: str) -> None:
    if pre in _DIGIT_SPLIT_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        return
    split = _LLAMA3_SPLIT if pre in _LLAMA3_PRE else _QWEN2_SPLIT if pre in _QWEN2_PRE else None
    if split is None:
        if pre not in _GPT2_PRE:
            log.warning("%s: unknown tokenizer.ggml.pre %r; splitting text like GPT-2", source, pre)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        return
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    if pre in _QWEN2_PRE:
        backend.normalizer = normalizers.NFC()  # as Qwen2's tokenizer.json


# A chat template comes with the model, so it may be hostile or broken: a render is bounded in loop steps, output
# and time (the sandbox already keeps it from Python's internals), and one over a bound fails as a bad request.
TEMPLATE_MAX_STEPS = 1_000_000  # items of every range() a render iterates over, together
TEMPLATE_MAX_CHARS = 8 << 20  # characters of a rendered prompt (twice the API's default body limit)
TEMPLATE_MAX_S = 5.0


class _RenderBudget:
    def __init__(self, deadline: float) -> None:
        self.deadline, self.steps, self.chars = deadline, 0, 0

    def spend(self, steps: int, chars: int) -> None:
        self.steps, self.chars = self.steps + steps, self.chars + chars
        if self.steps > TEMPLATE_MAX_STEPS:
            raise jinja2.exceptions.TemplateError(f"its loops ran over {TEMPLATE_MAX_STEPS} steps")
        if self.chars > TEMPLATE_MAX_CHARS:
            raise jinja2.exceptions.TemplateError(f"it wrote over {TEMPLATE_MAX_CHARS} characters")
        if time.monotonic() > self.deadline:
            raise jinja2.exceptions.TemplateError(f"it took over {TEMPLATE_MAX_S:.0f} s")


_BUDGET: ContextVar[_RenderBudget | None] = ContextVar("ringlet_template_budget", default=None)


def _spend(steps: int = 0, chars: int = 0) -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.spend(steps, chars)


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox, with range() and the repetition operators counted against the render's budget."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*" and isinstance(right, int) and isinstance(left, (str, list, tuple)):
            _spend(chars=len(left) * max(right, 0))
        elif operator == "*" and isinstance(left, int) and isinstance(right, (str, list, tuple)):
            _spend(chars=len(right) * max(left, 0))
        elif operator == "**" and isinstance(right, int) and right > 1000:
            raise jinja2.exceptions.TemplateError(f"it raised a number to the power {right}")
        return super().call_binop(context, operator, left, right)


def _bounded_range(*args: int) -> range:
    numbers = safe_range(*args)  # the sandbox's own: at most MAX_RANGE items
    _spend(steps=len(numbers))
    return numbers


def _jinja_env() -> ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in (trim/lstrip blocks, its helpers), bounded."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        # jinja's own tojson HTML-escapes; templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.globals["range"] = _bounded_range
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _token_content(token: Any) -> str | None:
    """tokenizer_config.json spells a special token as "text" or {"content": "text", ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None
