"""The Glowing service with a slow generator, served by tests/test_engine_http.py only:

    bentoml serve tests.slow_service:Glowing

Every model call of the generator takes at least ``GLOWING_TEST_STEP_MS`` (default 5) milliseconds
more, so that the tiny test model's requests last long enough to be abandoned half-way, as a real
model's do. Applied by patching ``service.loading.load`` from the test tree (as tests/faulty_service.py
does): the production code has no such switch.
"""

import os
import time

from glowing import artifacts as A
from service import loading

_load = loading.load


class SlowLM:
    def __init__(self, lm, seconds: float):
        self.lm, self.seconds = lm, seconds

    def forward(self, *args):
        time.sleep(self.seconds)
        return self.lm.forward(*args)

    def __getattr__(self, name):
        return getattr(self.lm, name)


def _slow_load(kind: str, settings):
    model = _load(kind, settings)
    if kind == A.GENERATOR:
        model._lm = SlowLM(model._lm, float(os.environ.get("GLOWING_TEST_STEP_MS", "5")) / 1e3)
    return model


loading.load = _slow_load

from service.service import GeneratorService, Glowing, ScorerService  # noqa: E402,F401  (what bentoml serve serves)
