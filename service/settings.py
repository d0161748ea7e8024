"""The service's settings: the only code that reads environment variables (prefix ``GLOWING_``).

    GLOWING_ARTIFACTS=/data/artifacts GLOWING_SCORER_MAX_BATCH_SIZE=64 bentoml serve

``get_settings()`` reads the environment when it is called. The one exception is
``service/service.py``, which calls it at import time because BentoML takes the batching
(``max_batch_size``, ``max_latency_ms``), traffic (``timeout``) and ``workers`` values from its
decorators: change those before ``bentoml serve`` starts, not after. The request limits also
shape the request schemas there, so that the OpenAPI page shows the limits actually enforced.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GLOWING_", extra="ignore", frozen=True)

    # ---- models -------------------------------------------------------------------------------
    artifacts: Path = Field(Path("artifacts"), description="artifacts directory: manifest.json and the "
                            "exported onnx/ (backend onnx) or the trained models (backend torch)")
    backend: Literal["onnx", "torch"] = Field("onnx", description="inference runtime")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when available, else CPU")
    classifier_precision: Literal["auto", "fp32", "int8", "fp16"] = Field(
        "auto", description="auto = fp32 on CPU, fp16 on CUDA. int8 (onnx, CPU only) scores one text per "
        "model call, so that a score never depends on its batch (its throughput: docs/LOADTESTS.md)")
    generator_precision: Literal["auto", "fp32", "int8", "fp16"] = Field(
        "auto", description="auto = fp32 on CPU, fp16 on CUDA. int8 (onnx, CPU only): 8-bit weight blocks with "
        "int8 products per row, so a row does not depend on its batch (speed and parity: docs/DECODING.md)")
    threads: int | None = Field(None, ge=1, description="intra-op threads per model; unset = half of the cores, "
                                "at least 1: the scorer and the generator run in processes of their own, and an "
                                "oversubscribed ONNX Runtime pool spin-waits (measured: docs/DECODING.md)")

    def model_threads(self) -> int:
        """``threads``, or half of the cores this process may use (at least 1)."""
        return self.threads or max(1, available_cores() // 2)

    # ---- batching ------------------------------------------------------------------------------
    batching: Literal["engine", "adaptive"] = Field(
        "engine", description="engine = the generator's iteration-level engine (rows join and leave the "
        "running batch at every step, tokens stream) and the scorer's zero-wait queue; adaptive = "
        "BentoML's request-level adaptive batching for both (the previous serving path, kept for comparison)")
    engine_max_rows: int = Field(64, ge=1, le=4096, description="engine: rows (sequences) in the running "
                                 "batch at most")
    engine_max_step_tokens: int = Field(4096, ge=1, description="engine: prompt positions (rows x longest "
                                        "prompt, padded) prefilled in one step at most; the head of the queue "
                                        "is always admitted when nothing runs")
    engine_max_waiting_steps: int = Field(8, ge=0, le=1000, description="engine: while rows run, decoding "
                                          "steps newcomers may wait so that one prefill takes several of them "
                                          "(TGI's max_waiting_tokens; they go at once when they are 1.2x the "
                                          "running rows, or when nothing runs); 0 = admit at every step")
    engine_max_waiting: int = Field(1024, ge=1, description="engine: rows waiting for admission at most; a "
                                    "request that would exceed it is answered 503 with Retry-After")

    # ---- adaptive batching (BentoML decorator values: read when service.py is imported) -------
    scorer_max_batch_size: int = Field(32, ge=1, le=1024, description="texts the classifier takes at once: "
                                       "engine, a take of the zero-wait queue (split into model calls by "
                                       "length); adaptive, BentoML's max_batch_size (1 turns it off)")
    scorer_max_batch_tokens: int = Field(8192, ge=1, description="padded positions (rows x longest text) per "
                                         "classifier call: a take is sorted by length and split into calls "
                                         "within this budget (both modes)")
    scorer_max_latency_ms: int = Field(5_000, ge=10, description="queue + compute budget of a scoring batch; "
                                       "requests that cannot meet it are shed with 503")
    generator_max_batch_size: int = Field(16, ge=1, le=256, description="generation requests merged per batch; "
                                          "1 turns adaptive batching off")
    generator_max_latency_ms: int = Field(60_000, ge=100, description="queue + compute budget of a generation "
                                          "batch; requests that cannot meet it are shed with 503")
    generator_max_rows: int = Field(64, ge=1, le=1024, description="sequences per generator call: a merged "
                                    "batch is split into calls of at most this many rows")

    # ---- request limits (they shape the request schemas) ---------------------------------------
    max_texts: int = Field(64, ge=1, description="texts per /score request")
    max_text_chars: int = Field(10_000, ge=1, description="characters per text to score")
    max_prompt_chars: int = Field(1_000, ge=0, description="characters per prompt")
    max_n: int = Field(16, ge=1, description="reviews per /generate or /reviews request")
    max_new_tokens: int = Field(256, ge=1, description="upper bound of the max_new_tokens field")
    max_candidates: int = Field(128, ge=1, description="upper bound of the /reviews max_candidates field")
    reviews: Literal["pipeline", "rounds"] = Field(
        "pipeline", description="/reviews: pipeline = candidates stream through the generator and each is scored "
        "as soon as it ends, the answer is the first n passing candidates in candidate order, the rest "
        "cancelled; rounds = generate a round, score it, repeat (the previous way, kept for comparison)")
    reviews_round_size: int = Field(16, ge=1, description="/reviews candidates per round (pipeline: in flight) "
                                    "at most")

    # ---- traffic ---------------------------------------------------------------------------------
    timeout: float = Field(120.0, gt=0, description="seconds a request may take; then 504")
    max_concurrency: int = Field(32, ge=1, description="requests in flight per API worker; more are shed "
                                 "with 503")
    api_workers: int = Field(1, ge=1, description="processes of the HTTP API service")
    scorer_workers: int = Field(1, ge=1, description="processes of the scorer service (one model copy each)")
    generator_workers: int = Field(1, ge=1, description="processes of the generator service (one model copy each)")

    # ---- deployment: models from BentoML's model store (issue 6; see docs/OPERATIONS.md) ------
    model_tag: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9._-]*(:[A-Za-z0-9][A-Za-z0-9._-]*)?$",
                                  description="serve this model-store model (name:version or name:latest, "
                                  "registered by `python -m export`) instead of GLOWING_ARTIFACTS; read when "
                                  "service.py is imported, so that `bentoml build` packs it into the Bento. "
                                  "Backend onnx only")

    @model_validator(mode="after")
    def _check_model_tag(self) -> Settings:
        if self.model_tag and self.backend != "onnx":
            raise ValueError(f"GLOWING_MODEL_TAG={self.model_tag} holds the ONNX export only: use "
                             "GLOWING_BACKEND=onnx, or GLOWING_ARTIFACTS with the trained models for torch")
        return self

    # ---- access and request size --------------------------------------------------------------------
    api_key: SecretStr | None = Field(None, description="when set, every endpoint except /livez, /readyz and "
                                      "/healthz (liveness) requires the header `Authorization: Bearer <key>`, "
                                      "/metrics and the OpenAPI page included; 401 otherwise. Unset or empty = off")
    max_body_bytes: int | None = Field(None, ge=1_024, description="largest request body in bytes, 413 beyond; "
                                       "unset = enough for max_texts texts of max_text_chars characters each")

    def body_limit(self) -> int:
        """``max_body_bytes``, or what the largest valid ``/score`` body can need: JSON may spend 6 bytes
        on a character (\\uXXXX); the rest is field names and slack."""
        return self.max_body_bytes or self.max_texts * (self.max_text_chars * 6 + 16) + 65_536

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.max_candidates < self.max_n:
            raise ValueError(f"GLOWING_MAX_CANDIDATES={self.max_candidates} must be >= GLOWING_MAX_N={self.max_n}")
        if self.device == "cuda" and self.classifier_precision == "int8":
            raise ValueError("GLOWING_CLASSIFIER_PRECISION=int8 is the CPU format; use fp16 or auto with "
                             "GLOWING_DEVICE=cuda")
        if self.device == "cuda" and self.generator_precision == "int8":
            raise ValueError("GLOWING_GENERATOR_PRECISION=int8 is the CPU format; use fp16 or auto with "
                             "GLOWING_DEVICE=cuda")
        return self


def available_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (a container's
    CPU limit: ``os.cpu_count()`` would count the whole host's cores)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = None
    try:
        limit, period = (cgroup / "cpu.max").read_text().split()[:2]  # cgroup v2: "max 100000" or "200000 100000"
        if limit != "max":
            quota = int(limit) / int(period)
    except (OSError, ValueError):
        try:  # cgroup v1
            limit = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
            if limit > 0:
                quota = limit / int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            pass
    return max(1, min(cores, int(quota + 0.999) if quota else cores))


def get_settings(**overrides) -> Settings:
    """The settings from the environment now (keyword overrides win; tests use them)."""
    return Settings(**overrides)


def env_table() -> list[tuple[str, str, str]]:
    """(variable, default, description) for every setting: the table in docs/OPERATIONS.md
    (``python -m deploy.settings_doc``)."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = "unset" if field.default is None else str(field.default)
        rows.append((f"GLOWING_{name.upper()}", default, field.description or ""))
    return rows
