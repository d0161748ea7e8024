"""The Glowing service with test faults, for the real-server tests that need them:

    GLOWING_TEST_STEP_MS=10 bentoml serve tests.patched_service:Glowing     # a slow generator
    GLOWING_TEST_FAULT=1 bentoml serve tests.patched_service:Glowing        # a faulty scorer

``GLOWING_TEST_STEP_MS``: every model call of the generator takes that many milliseconds more, so that the
tiny test model's requests last long enough to be abandoned half-way, as a real model's do
(tests/test_engine_http.py). ``GLOWING_TEST_FAULT=1``: a scoring batch (a take of the zero-wait queue, or an
adaptive batch) that holds a text containing ``FAULT`` raises inside the model call, as a runtime error or
a model bug would; every other batch is scored normally (tests/test_reliability_http.py).

Applied by patching ``service.loading.load`` before the service module is imported (every BentoML worker
imports this module): the faults live in the test tree, and the production code has no switch that could
inject them.
"""

import logging
import os
import time

from glowing import artifacts as A
from service import loading

FAULT = "<<inject a fault into this batch>>"
log = logging.getLogger("bentoml.glowing")
_load = loading.load


class SlowLM:
    def __init__(self, lm, seconds: float):
        self.lm, self.seconds = lm, seconds

    def forward(self, *args):
        time.sleep(self.seconds)
        return self.lm.forward(*args)

    def __getattr__(self, name):
        return getattr(self.lm, name)


class FaultyScorer:
    def __init__(self, model):
        self.model = model

    def score(self, texts: list[str]) -> list[float]:  # GLOWING_BATCHING=adaptive
        self._check(texts)
        return self.model.score(texts)

    def encode(self, texts: list[str]) -> list[list[int]]:  # the engine mode's ScoreQueue starts here
        self._check(texts)
        return self.model.encode(texts)

    @staticmethod
    def _check(texts: list[str]) -> None:
        if any(FAULT in t for t in texts):
            log.warning("injected fault: a batch of %d texts fails", len(texts))
            raise RuntimeError("injected fault")

    def __getattr__(self, name):
        return getattr(self.model, name)


def _patched_load(kind: str, settings):
    model = _load(kind, settings)
    step_ms = os.environ.get("GLOWING_TEST_STEP_MS")
    if kind == A.GENERATOR and step_ms:
        model._lm = SlowLM(model._lm, float(step_ms) / 1e3)
    if kind == A.CLASSIFIER and os.environ.get("GLOWING_TEST_FAULT") == "1":
        model = FaultyScorer(model)
    return model


loading.load = _patched_load

from service.service import GeneratorService, Glowing, ScorerService  # noqa: E402,F401  (what bentoml serve serves)
