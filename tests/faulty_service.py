"""The Glowing service with a fault in its scorer, served by tests/test_reliability_http.py only:

    bentoml serve tests.faulty_service:Glowing

A scoring batch (a take of the zero-wait queue, or an adaptive batch) that holds a text containing ``FAULT`` raises inside the model call, as a runtime
error or a model bug would; every other batch is scored normally. The fault lives here, in the test
tree, and is applied by patching ``service.loading.load`` before the service module is imported (every
BentoML worker imports this module): the production code has no switch that could inject it.
"""

import logging

from glowing import artifacts as A
from service import loading

FAULT = "<<inject a fault into this batch>>"
log = logging.getLogger("bentoml.glowing")
_load = loading.load


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


def _faulty_load(kind: str, settings):
    model = _load(kind, settings)
    return FaultyScorer(model) if kind == A.CLASSIFIER else model


loading.load = _faulty_load

from service.service import GeneratorService, Glowing, ScorerService  # noqa: E402,F401  (what bentoml serves)
