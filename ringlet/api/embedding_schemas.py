"""The request and response shapes of the embeddings endpoints: OpenAI's /v1/embeddings, Ollama's /api/embed and its
older /api/embeddings, and their mapping to an `EmbeddingTask`."""

from __future__ import annotations

import base64
import struct
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from ringlet.api.ollama_schemas import KeepAliveField, Options
from ringlet.shared.tasks import MAX_EMBEDDING_INPUTS, MAX_INPUT_CHARS, MAX_INPUT_TOKENS, EmbeddingTask

Text = Annotated[str, Field(min_length=1, max_length=MAX_INPUT_CHARS)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=MAX_INPUT_TOKENS)]


def _input_form(value: object) -> str:
    """Which form an input is in, judged by its first item, so that a bad one is refused for what it meant to be
    ("input.texts.2: String should have at least 1 character"), not for every form it is not."""
    if not isinstance(value, list):
        return "text"
    first = value[0] if value else ""
    return "token_ids" if isinstance(first, int) else "token_id_lists" if isinstance(first, list) else "texts"


Texts = Annotated[list[Text], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
OpenAIInput = Annotated[
    Annotated[Text, Tag("text")] | Annotated[Texts, Tag("texts")] | Annotated[TokenIds, Tag("token_ids")]
    | Annotated[list[TokenIds], Tag("token_id_lists"), Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)],
    Discriminator(_input_form)]
OllamaInput = Annotated[
    Annotated[str, Tag("text"), Field(max_length=MAX_INPUT_CHARS)]
    | Annotated[list[Text], Tag("texts"), Field(max_length=MAX_EMBEDDING_INPUTS)],
    Discriminator(lambda value: "texts" if isinstance(value, list) else "text")]


# --- OpenAI


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request; a field it does not declare is a 400 naming it."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    input: OpenAIInput = Field(description="a text, a list of texts, a list of token ids, or a list of lists of "
                                           "token ids")
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: each embedding's float32 "
                                                                             "values, little-endian, as base64")
    dimensions: int | None = Field(None, ge=1, description="keep the first this many values of each embedding, "
                                                           "normalised again where the model normalises "
                                                           "(Matryoshka); more than the model's "
                                                           "size is a 400")
    user: str | None = Field(None, max_length=256, description="accepted and ignored")

    def inputs(self) -> list[str] | list[list[int]]:
        """The inputs as a list: one text or one list of token ids becomes a list of one."""
        if isinstance(self.input, str):
            return [self.input]
        if self.input and isinstance(self.input[0], int):
            return [self.input]
        return self.input  # type: ignore[return-value]

    def to_task(self) -> EmbeddingTask:
        return EmbeddingTask(model=self.model, inputs=self.inputs(), dimensions=self.dimensions)


class EmbeddingObject(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="the values, or with encoding_format base64 their float32 "
                                                     "bytes as base64")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingObject]
    model: str
    usage: EmbeddingUsage


def encoded(vector: list[float], encoding_format: Literal["float", "base64"]) -> list[float] | str:
    if encoding_format == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


# --- Ollama


class _OllamaEmbedFields(KeepAliveField):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    options: Options | None = Field(None, description="accepted; none of them changes an embedding")


class EmbedRequest(_OllamaEmbedFields):
    """Ollama's /api/embed: an empty input ("" or []) only loads the model, and answers no embeddings."""

    input: OllamaInput = ""
    truncate: bool | None = Field(None, description="cut an input longer than the context window to fit (the "
                                                    "default); false: such an input is a 400")
    dimensions: int | None = Field(None, ge=1, description="keep the first this many values of each embedding, "
                                                           "normalised again where the model normalises")

    def inputs(self) -> list[str]:
        return ([self.input] if self.input else []) if isinstance(self.input, str) else self.input

    def to_task(self) -> EmbeddingTask:
        return EmbeddingTask(model=self.model, inputs=self.inputs(), truncate=self.truncate is not False,
                             dimensions=self.dimensions)


class EmbedResponse(BaseModel):
    model: str
    embeddings: list[list[float]]
    total_duration: int = Field(description="nanoseconds")
    load_duration: int = Field(0, description="nanoseconds")
    prompt_eval_count: int


class EmbeddingsRequest(_OllamaEmbedFields):
    """Ollama's older /api/embeddings: one prompt; an empty one only loads the model."""

    prompt: Annotated[str, Field(max_length=MAX_INPUT_CHARS)] = ""

    def to_task(self) -> EmbeddingTask:
        return EmbeddingTask(model=self.model, inputs=[self.prompt])


class EmbeddingsResponse(BaseModel):
    embedding: list[float]
