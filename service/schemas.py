"""HTTP request and response bodies. Every request bound is declared on its field, so the OpenAPI
page shows the limits that are enforced; cross-field rules are validators that name the field.

The request models are built from the settings (``request_models(settings)``) because the
limits are deployment settings; the response models and the generator's work item are fixed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from service.settings import Settings

THRESHOLD = 0.5  # p_positive at or above it is labelled "positive"
SEED_MAX = 2**32 - 1


def label(p_positive: float) -> Literal["positive", "negative"]:
    return "positive" if p_positive >= THRESHOLD else "negative"


# ---- responses ---------------------------------------------------------------------------------

class Score(BaseModel):
    label: Literal["positive", "negative"] = Field(description=f"positive when p_positive >= {THRESHOLD}")
    p_positive: float = Field(ge=0, le=1, description="the classifier's probability that the text is positive")


class ScoreResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example":
        {"results": [{"label": "positive", "p_positive": 0.973}, {"label": "negative", "p_positive": 0.041}]}})
    results: list[Score] = Field(description="one per input text, in input order")


class Review(BaseModel):
    text: str = Field(description="the prompt followed by the generated continuation")
    p_positive: float = Field(ge=0, le=1, description="the classifier's probability that the review is positive")
    label: Literal["positive", "negative"]


class GenerateResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example":
        {"reviews": [{"text": "This movie is a delight from start to finish.", "p_positive": 0.96,
                      "label": "positive"}], "seed": 7}})
    reviews: list[Review] = Field(description="n reviews, in generation order")
    seed: int = Field(description="the seed used (the request's, or one drawn by the server): send it back "
                                  "to get the same reviews")


class ReviewsStats(BaseModel):
    candidates: int = Field(description="candidates generated (and scored)")
    accepted: int = Field(description="distinct candidates with p_positive >= min_positive")
    rounds: int = Field(description="generate-then-score rounds (GLOWING_REVIEWS=pipeline: waves of candidates "
                        "sent to the generator)")
    acceptance_rate: float = Field(description="accepted / candidates (0 when no candidate was generated)")
    tokens: int = Field(0, description="tokens generated for all candidates")
    cancelled: int = Field(0, description="candidates cancelled before they ended, once the answer was known")
    wasted_tokens: int = Field(0, description="tokens generated for candidates that were rejected or cancelled "
                               "(for cancelled ones, up to 7 tokens each may go uncounted)")
    elapsed_ms: float = Field(description="wall time spent on the request")


class ReviewsResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example":
        {"reviews": [{"text": "This movie is wonderful, the cast is superb.", "p_positive": 0.991,
                      "label": "positive"}],
         "complete": True, "seed": 7,
         "stats": {"candidates": 8, "accepted": 3, "rounds": 1, "acceptance_rate": 0.375, "elapsed_ms": 412.0}}})
    reviews: list[Review] = Field(description="up to n reviews with p_positive >= min_positive: the first "
                                  "passing candidates in candidate order (GLOWING_REVIEWS=rounds: best first)")
    complete: bool = Field(description="false when the candidate budget ran out before n reviews were accepted")
    seed: int = Field(description="the seed used: send it back to get the same answer")
    stats: ReviewsStats


class InfoResponse(BaseModel):
    service: dict = Field(description="name, version, backend, device")
    models: dict = Field(description="per model: version (sha256 prefix), file, precision, active providers")
    batching: dict = Field(description="adaptive batching settings per model")
    limits: dict = Field(description="request limits")
    metrics: dict = Field(description="evaluation metrics from the manifest (dotted keys)")


# ---- the generator's work item (service to service, not HTTP-facing) --------------------------

class GenerationItem(BaseModel):
    """``n`` continuations of one prompt; row ``i`` is sampled with ``derive_seed(seed, first_row + i)``
    (service/batching.py): /reviews sends its candidates in waves of consecutive rows."""

    prompt: str
    n: int = Field(ge=1)
    max_new_tokens: int = Field(ge=1)
    temperature: float = Field(ge=0)
    top_p: float = Field(gt=0, le=1)
    top_k: int = Field(ge=0)
    seed: int = Field(ge=0)
    first_row: int = Field(0, ge=0)


# ---- requests ----------------------------------------------------------------------------------

# Any character but whitespace (exactly Python's str.isspace() set), written so that JSON Schema
# (ECMA-262) regexes and Python's agree: \S differs between them on U+0085, U+FEFF and U+001C-1F.
NOT_BLANK = r"[^\t\n\v\f\r \x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"


def _not_blank(text: str) -> str:
    if not re.search(NOT_BLANK, text):
        raise PydanticCustomError("blank_text", "only whitespace; send text to score")
    return text


@dataclass(frozen=True)
class RequestModels:
    score: type[BaseModel]
    generate: type[BaseModel]
    reviews: type[BaseModel]
    info: type[BaseModel]


def request_models(settings: Settings) -> RequestModels:
    """The request bodies with the deployment's limits as field bounds."""
    s = settings
    # pattern: what the OpenAPI page shows; the validator: what is enforced, with a message that says why
    Text = Annotated[str, StringConstraints(min_length=1, max_length=s.max_text_chars), AfterValidator(_not_blank),
                     Field(json_schema_extra={"pattern": NOT_BLANK})]
    # A misspelt field ("max_tokens") is an error, not silently ignored; "n": "3", true or 2.5 and NaN or
    # Infinity (Python's json writes them) are wrong types, not coerced or compared.
    forbid = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    class Sampling(BaseModel):
        model_config = forbid
        prompt: str = Field("", max_length=s.max_prompt_chars,
                            description="the opening of the review; empty = the model starts it")
        n: int = Field(1, ge=1, le=s.max_n, description="how many reviews")
        max_new_tokens: int = Field(64, ge=1, le=s.max_new_tokens, description="tokens to generate per review "
                                    "at most (generation also stops at end of text)")
        temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy: all n reviews are then identical")
        top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling (1 = off)")
        top_k: int = Field(50, ge=0, le=1000, description="keep the k most likely tokens (0 = off)")
        seed: int | None = Field(None, ge=0, le=SEED_MAX, description="same seed and settings, same reviews; "
                                 "unset = the server draws one and returns it")

        def generation_item(self, n: int, seed: int, first_row: int = 0) -> GenerationItem:
            """The generator's work item: ``n`` rows of this request's prompt and sampling, row ``i`` sampled
            with ``derive_seed(seed, first_row + i)``."""
            return GenerationItem(prompt=self.prompt, n=n, max_new_tokens=self.max_new_tokens,
                                  temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=seed,
                                  first_row=first_row)

    class ScoreRequest(BaseModel):
        model_config = ConfigDict(**forbid, json_schema_extra={"example":
            {"texts": ["A wonderful, moving film.", "Dull and far too long."]}})
        texts: list[Text] = Field(min_length=1, max_length=s.max_texts,
                                  description=f"1 to {s.max_texts} texts of 1 to {s.max_text_chars} characters")

    class GenerateRequest(Sampling):
        model_config = ConfigDict(**forbid, json_schema_extra={"example":
            {"prompt": "This movie", "n": 2, "max_new_tokens": 48, "temperature": 0.9, "top_p": 0.95,
             "top_k": 50, "seed": 7}})
        stream: bool = Field(False, description="answer Server-Sent Events (text/event-stream): "
                             '{"index", "delta"} as tokens are made, {"index", "text", "p_positive", "label", '
                             '"finish_reason", "seed"} when a review ends, then [DONE]')

    class ReviewsRequest(Sampling):
        model_config = ConfigDict(**forbid, json_schema_extra={"example":
            {"prompt": "This movie", "n": 3, "min_positive": 0.9, "max_candidates": 32, "seed": 7}})
        n: int = Field(3, ge=1, le=s.max_n, description="how many accepted reviews to return at most")
        min_positive: float = Field(0.9, ge=0, le=1, description="accept a review when p_positive >= this")
        max_candidates: int = Field(min(32, s.max_candidates), ge=1, le=s.max_candidates,
                                    description="candidate budget: generate at most this many; must be >= n")
        stream: bool = Field(False, description="answer Server-Sent Events (text/event-stream): each accepted "
                             'review as {"index", "candidate", "text", "p_positive", "label"} once its place in '
                             'the answer is settled, then {"complete", "seed", "stats"}, then [DONE]')

        @field_validator("max_candidates")
        @classmethod
        def _budget_covers_n(cls, value: int, info: ValidationInfo) -> int:
            n = info.data.get("n")
            if n is not None and value < n:
                raise PydanticCustomError("budget_below_n", "must be >= n ({n}), got {value}",
                                          {"n": n, "value": value})
            return value

    class InfoRequest(BaseModel):
        model_config = forbid

    for model in (ScoreRequest, GenerateRequest, ReviewsRequest, InfoRequest):
        model.__module__ = __name__  # a stable name in the OpenAPI components
    return RequestModels(ScoreRequest, GenerateRequest, ReviewsRequest, InfoRequest)
