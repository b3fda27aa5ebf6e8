"""The thinking splitter fed a sample answer cut at every character boundary (once, twice, and one character at a
time) puts back the same thinking and answer as a plain reading of the whole text; and which chat templates and
vocabularies make a model one that thinks, with or without the prompt opening its thinking."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers

from ringlet.models.embedded import embedded_model_path
from ringlet.models.gguf_loader import GGUFModel
from ringlet.models.thinking import ThinkingSplitter, splitter_for, thinking_format
from ringlet.models.tokenizer import Tokenizer
from ringlet.shared.tasks import ChatMessage, Constraint, SamplingParams, TextGenerationTask, ThinkingFormat
from ringlet.worker.engines.torch.generate import prompt_ids
from ringlet.worker.runner import ready

# (answer as written, the prompt opened the block, thinking, answer)
SAMPLES = [
    ("<think>\nThe user asks 1+1.\nThat is 2.\n</think>\n\nIt is 2.", False, "The user asks 1+1.\nThat is 2.", "It is 2."),
    ("Okay, 1+1 is 2.\n</think>\n\n**2**", True, "Okay, 1+1 is 2.", "**2**"),
    ("<think>\nagain</think>2", True, "again", "2"),
    ("  <think></think>  Hi <think>no</think>", False, "", "Hi <think>no</think>"),
    ("<think>\n\n</think>\n\nHello.", False, "", "Hello."),
    (" Hello <think>x</think>", False, "", " Hello <think>x</think>"),
    ("<thin>k</think> text", False, "", "<thin>k</think> text"),
    ("<think>a </thin> b </ c\n</think", False, "a </thin> b </ c\n</think", ""),
    ("no end to the thinking <", True, "no end to the thinking <", ""),
    ("<thi", False, "", "<thi"),
    ("<thi", True, "<thi", ""),
    ("  \n", False, "", "  \n"),
    ("  \n", True, "", ""),
    ("", False, "", ""),
    ("<think>x</think><tool_call>\n{}</tool_call>", False, "x", "<tool_call>\n{}</tool_call>"),
]


def split_whole(text: str, inside: bool) -> tuple[str, str]:
    """A plain reading of a whole answer, the reference the streamed splits are held to."""
    rest = text.lstrip()
    if rest.startswith("<think>"):
        rest, inside = rest[len("<think>"):], True
    if not inside:
        return "", text
    thinking, closed, answer = rest.partition("</think>")
    return thinking.strip(), answer.lstrip() if closed else ""


def split_in_pieces(pieces: list[str], inside: bool) -> tuple[str, str]:
    splitter = ThinkingSplitter(inside)
    thinking, answer = [], []
    for piece in pieces:
        t, a = splitter.feed(piece)
        thinking.append(t)
        answer.append(a)
    t, a = splitter.finish()
    return "".join(thinking) + t, "".join(answer) + a


@pytest.mark.parametrize(("text", "inside", "thinking", "answer"), SAMPLES)
def test_the_reference_reads_each_sample_as_expected(text: str, inside: bool, thinking: str, answer: str) -> None:
    assert split_whole(text, inside) == (thinking, answer)
    assert split_in_pieces([text], inside) == (thinking, answer)


@pytest.mark.parametrize(("text", "inside", "thinking", "answer"), SAMPLES)
def test_every_split_of_the_stream_reassembles_the_same_parts(text: str, inside: bool, thinking: str,
                                                              answer: str) -> None:
    for cut in range(len(text) + 1):
        assert split_in_pieces([text[:cut], text[cut:]], inside) == (thinking, answer), f"cut at {cut}"
    for first, second in itertools.combinations(range(len(text) + 1), 2):
        pieces = [text[:first], text[first:second], text[second:]]
        assert split_in_pieces(pieces, inside) == (thinking, answer), f"cut at {first} and {second}"
    assert split_in_pieces(list(text), inside) == (thinking, answer), "one character at a time"


def test_a_marker_never_comes_out_half_written() -> None:
    splitter = ThinkingSplitter(inside=False)
    assert splitter.feed("<thi") == ("", "")
    assert splitter.feed("nk>\nStep one") == ("Step one", "")
    assert splitter.feed(".\n</th") == (".", ""), "the newline and the marker's start wait"
    assert splitter.feed("ink>\n\nThe") == ("", "The")
    assert splitter.feed(" answer") == ("", " answer")
    assert splitter.finish() == ("", "")


def test_an_answer_without_thinking_streams_at_once() -> None:
    splitter = ThinkingSplitter(inside=False)
    assert splitter.feed("Paris") == ("", "Paris"), "text that cannot open a block is not held"
    assert splitter.feed(" <think>") == ("", " <think>")


QWEN3_LIKE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
R1_LIKE = ("{% for message in messages %}{{ message.role }}: {{ message.content.split('</think>')[-1] }}\n{% endfor %}"
           "{% if add_generation_prompt %}assistant: <think>\n{% endif %}")
PLAIN = ("{% for message in messages %}{{ message.role }}: {{ message.content }}\n{% endfor %}"
         "{% if add_generation_prompt %}assistant:{% endif %}")


def tokenizer(template: str | None, think_tokens: bool, special: bool = False) -> Tokenizer:
    """Byte-level, without merges: any text round-trips; the think markers are single tokens when asked."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = BackendTokenizer(models.BPE(vocab, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    if think_tokens:
        (backend.add_special_tokens if special else backend.add_tokens)(["<think>", "</think>"])
    return Tokenizer(backend, chat_template=template)


def test_qwen3_style_templates_think_with_a_switch_that_closes_the_block() -> None:
    assert thinking_format(tokenizer(QWEN3_LIKE, think_tokens=True)) == ThinkingFormat(switch=True)


def test_r1_style_templates_open_the_block_in_the_prompt() -> None:
    found = thinking_format(tokenizer(R1_LIKE, think_tokens=True))
    assert found == ThinkingFormat(switch=False, opened_by_default=True, opened_when_on=True, opened_when_off=True)
    assert found.opened(None) and found.opened(False)


def test_the_vocabulary_alone_marks_a_thinking_model_and_a_plain_one_does_not_think() -> None:
    assert thinking_format(tokenizer(PLAIN, think_tokens=True)) == ThinkingFormat()
    assert thinking_format(tokenizer(PLAIN, think_tokens=False)) is None
    assert thinking_format(tokenizer(None, think_tokens=False)) is None


def test_markers_that_decoding_drops_cannot_be_read_back() -> None:
    assert thinking_format(tokenizer(PLAIN, think_tokens=True, special=True)) is None


def test_the_embedded_model_does_not_think() -> None:
    assert thinking_format(GGUFModel.open(embedded_model_path()).tokenizer()) is None


def test_the_splitter_follows_the_switch_and_stays_out_of_raw_prompts_and_grammars() -> None:
    qwen = ThinkingFormat(switch=True, opened_when_on=True)
    chat = TextGenerationTask(messages=[ChatMessage(role="user", content="hi")])
    assert splitter_for(None, chat) is None, "a model that does not think"
    splitter = splitter_for(qwen, chat.model_copy(update={"thinking": True}))
    assert splitter is not None and splitter.inside
    splitter = splitter_for(qwen, chat)
    assert splitter is not None and not splitter.inside
    assert splitter_for(qwen, TextGenerationTask(prompt="hi")) is None
    constrained = TextGenerationTask(messages=chat.messages,
                                     sampling=SamplingParams(constraint=Constraint(kind="json_object")))
    assert splitter_for(qwen, constrained) is None and constrained.thinking_switch is False


def test_the_switch_reaches_the_chat_template() -> None:
    qwen = tokenizer(QWEN3_LIKE, think_tokens=True)
    chat = TextGenerationTask(messages=[ChatMessage(role="user", content="What is 1 + 1?")])

    def prompt(task: TextGenerationTask) -> str:
        return qwen.decode(prompt_ids(qwen, task), skip_special_tokens=False)

    assert prompt(chat.model_copy(update={"thinking": False})).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert prompt(chat.model_copy(update={"thinking": True})).endswith("<|im_start|>assistant\n")
    assert prompt(chat).endswith("<|im_start|>assistant\n"), "left out: the template's default"
    constrained = chat.model_copy(update={"sampling": SamplingParams(constraint=Constraint(kind="json_object"))})
    assert prompt(constrained).endswith("</think>\n\n"), "a grammar leaves no room for thinking"


def test_the_runner_reports_how_its_model_thinks() -> None:
    def engine(holding: object) -> SimpleNamespace:
        return SimpleNamespace(name="torch", device=SimpleNamespace(type="cpu"), tokenizer=holding)

    assert ready(engine(tokenizer(QWEN3_LIKE, think_tokens=True)), "cpu", 4096, 0.0).thinking == ThinkingFormat(
        switch=True)
    assert ready(engine(tokenizer(PLAIN, think_tokens=False)), "cpu", 4096, 0.0).thinking is None
    assert ready(SimpleNamespace(name="torch-pipeline"), "cpu", 4096, 0.0).thinking is None, "a middle stage"
