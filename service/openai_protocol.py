"""The OpenAI-compatible completions API: request and response bodies, and the translation to our own
requests (no BentoML here; service/service.py serves ``/v1/completions`` and ``/v1/models``).

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:3000/v1", api_key="<GLOWING_API_KEY or anything>")
    client.completions.create(model="glowing-generator", prompt="This movie", max_tokens=32, n=2, seed=7)
    client.completions.create(model="glowing-generator", prompt="This movie", n=3,
                              extra_body={"min_positive": 0.9, "max_candidates": 32})

As in vLLM's ``protocol.py``, every bound is declared on its field and the request is translated at
the boundary. Fields of OpenAI's API that we do not implement are refused with a 400 that names them
unless they hold their neutral value (``echo: false``, ``best_of`` equal to ``n``, zero penalties, ...):
a value we would otherwise ignore is never accepted. Every choice carries ``p_positive``, the
classifier's score of the prompt and its text; with ``min_positive`` the choices are the accepted
reviews of a ``/reviews`` request (the first passing candidates in candidate order).
"""

from __future__ import annotations

import secrets
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from service.batching import derive_seed
from service.schemas import SEED_MAX, RequestModels
from service.settings import Settings

MODEL_ID = "glowing-generator"
# field -> its neutral value(s): accepted, anything else is a 400 naming the field
NEUTRAL: dict[str, tuple] = {"echo": (False,), "suffix": (None, ""), "logit_bias": (None, {}),
                             "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
                             "logprobs": (None, 0), "stream_options": (None,)}


def _unsupported(name: str):
    allowed = NEUTRAL[name]

    def check(cls, value, info: ValidationInfo):
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            raise PydanticCustomError("unsupported", "not supported by this server (only {allowed})",
                                      {"allowed": " or ".join(map(repr, allowed))})
        return value

    return field_validator(name)(classmethod(check))


def completion_request(settings: Settings) -> type[BaseModel]:
    s = settings
    Prompt = Annotated[str, StringConstraints(max_length=s.max_prompt_chars)]
    Prompts = Annotated[list[Prompt], Field(min_length=1, max_length=s.max_n)]
    Stop = Annotated[str, StringConstraints(min_length=1, max_length=100)]
    Stops = Annotated[list[Stop], Field(max_length=4)]

    class CompletionRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, json_schema_extra={"example":
            {"model": MODEL_ID, "prompt": "This movie", "max_tokens": 32, "n": 2, "seed": 7}})
        # the schema names the one model; another name is a 404 (model_not_found), as OpenAI answers it
        model: str = Field(max_length=200, json_schema_extra={"enum": [MODEL_ID]},
                           description=f"the served model: {MODEL_ID} (GET /v1/models)")
        prompt: Prompt | Prompts = Field(description="a prompt, or a list of up to "
                                         f"{s.max_n} prompts (n choices each, in prompt order)")
        max_tokens: int = Field(16, ge=1, le=s.max_new_tokens, description="tokens per choice at most")
        temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy")
        top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling (1 = off)")
        top_k: int = Field(0, ge=0, le=1000, description="extension: keep the k most likely tokens (0 = off)")
        n: int = Field(1, ge=1, le=s.max_n, description="choices per prompt (with min_positive: accepted "
                       "reviews at most)")
        seed: int | None = Field(None, ge=0, le=SEED_MAX, description="same seed and settings, same choices "
                                 "(unset: the server draws one; the response's system_fingerprint holds it)")
        stop: Stop | Stops | None = Field(None, description="up to 4 strings; a choice ends before the first "
                                             "one it contains (finish_reason stop)")
        stream: bool = Field(False, description="answer Server-Sent Events: completion chunks, then [DONE]")
        user: str | None = Field(None, max_length=256, description="the end user's id (logged, not used)")
        min_positive: float | None = Field(None, ge=0, le=1, description="extension: the choices are up to n "
                                           "reviews with p_positive >= this, the first passing candidates in "
                                           "candidate order (as /reviews)")
        max_candidates: int | None = Field(None, ge=1, le=s.max_candidates, description="extension, with "
                                           "min_positive: candidates per prompt at most (default min(32, "
                                           f"{s.max_candidates})); must be >= n")
        # OpenAI's fields we do not implement: accepted at their neutral value only, left out of the schema
        best_of: SkipJsonSchema[int | None] = None
        echo: SkipJsonSchema[bool] = False
        suffix: SkipJsonSchema[str | None] = None
        logit_bias: SkipJsonSchema[dict[str, float] | None] = None
        logprobs: SkipJsonSchema[int | None] = None
        presence_penalty: SkipJsonSchema[float | None] = None
        frequency_penalty: SkipJsonSchema[float | None] = None
        stream_options: SkipJsonSchema[dict | None] = None

        _echo = _unsupported("echo")
        _suffix = _unsupported("suffix")
        _bias = _unsupported("logit_bias")
        _logprobs = _unsupported("logprobs")
        _presence = _unsupported("presence_penalty")
        _frequency = _unsupported("frequency_penalty")
        _stream_options = _unsupported("stream_options")

        def prompts(self) -> list[str]:
            return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

        def stops(self) -> list[str]:
            return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

        def internal(self, prompt: str, settings: Settings, models: RequestModels) -> BaseModel:
            """Our /generate (or, with min_positive, /reviews) request for one prompt: the same sampling."""
            fields = {"prompt": prompt, "n": self.n, "max_new_tokens": self.max_tokens,
                      "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "seed": None}
            if self.min_positive is None:
                return models.generate.model_construct(**fields)
            budget = self.max_candidates or max(self.n, min(32, settings.max_candidates))
            return models.reviews.model_construct(**fields, min_positive=self.min_positive, max_candidates=budget)

        @field_validator("best_of")
        @classmethod
        def _best_of(cls, value, info: ValidationInfo):
            if value is not None and value != info.data.get("n"):
                raise PydanticCustomError("unsupported", "not supported by this server (only null or equal to "
                                          "n); for the best of several candidates send min_positive")
            return value

        @field_validator("max_candidates")
        @classmethod
        def _budget(cls, value, info: ValidationInfo):
            n = info.data.get("n")
            if value is not None and n is not None and value < n:
                raise PydanticCustomError("budget_below_n", "must be >= n ({n}), got {value}", {"n": n, "value": value})
            if value is not None and info.data.get("min_positive") is None:
                raise PydanticCustomError("needs_min_positive", "only with min_positive")
            return value

    CompletionRequest.__module__ = __name__
    return CompletionRequest


class ModelsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


ModelsRequest.__module__ = __name__


# ---- responses ---------------------------------------------------------------------------------

class Choice(BaseModel):
    text: str = Field(description="the continuation (the prompt excluded)")
    index: int = Field(description="prompt k, choice j: k * n + j")
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None
    p_positive: float | None = Field(None, description="extension: the classifier's score of prompt + text")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = Field(description="tokens generated (with min_positive: for every candidate)")
    total_tokens: int


class Completion(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {
        "id": "cmpl-1f0c3a9b", "object": "text_completion", "created": 1764470000, "model": MODEL_ID,
        "system_fingerprint": "seed-7", "choices": [{"text": " is a delight.", "index": 0, "logprobs": None,
                                                     "finish_reason": "stop", "p_positive": 0.97}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}}})
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str = Field(description="seed-<the seed used>: send it back as seed to replay")
    choices: list[Choice]
    usage: Usage
    reviews: dict = Field(default_factory=dict, description="extension, with min_positive: per prompt (its index "
                          "as a string), complete and stats as /reviews answers them; else empty")


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "glowing"
    version: str | None = Field(None, description="extension: the generator's version (sha256 prefix)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


# ---- translation -------------------------------------------------------------------------------

def prompt_seed(seed: int, k: int) -> int:
    """Prompt 0 uses the seed itself (so its choices are /generate's rows for that seed); others derive one."""
    return seed if k == 0 else derive_seed(seed, "prompt", k)


def new_id() -> str:
    return f"cmpl-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def chunk(cid: str, created: int, seed: int, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": cid, "object": "text_completion", "created": created, "model": MODEL_ID,
            "system_fingerprint": f"seed-{seed}", "choices": choices}


class StopCutter:
    """A choice's text as it streams, cut before the first stop string; the last ``len(stop) - 1``
    characters are held back until they cannot begin one."""

    def __init__(self, stop: list[str]):
        self.stop, self.hold = stop, max(map(len, stop), default=1) - 1
        self.text, self.sent, self.stopped = "", 0, False

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        self.text += delta
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self.text = True, self.text[:min(hits)]
            return self._flush(len(self.text))
        return self._flush(max(self.sent, len(self.text) - self.hold))

    def finish(self) -> str:
        return self._flush(len(self.text))

    def _flush(self, upto: int) -> str:
        out, self.sent = self.text[self.sent:upto], max(self.sent, upto)
        return out
