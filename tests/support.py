"""Helpers the test modules share (plain functions and classes; the fixtures are in conftest.py).

Tiny synthetic data in the shared-data layout, the tiny training preset's arguments, the launcher of a
real ``bentoml serve`` and the check of the error envelope. Test modules import from here, never from
each other or from conftest.py.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import httpx
import pytest

from loadtests.server import ROOT
from loadtests.server import Server as ServedGlowing

POSITIVE = "great wonderful superb moving brilliant delightful loved best touching excellent".split()
NEGATIVE = "awful boring terrible dull worst waste stupid bad painful mess".split()
NEUTRAL = ("the movie film plot actor story scene director cast was is and a of it this that with "
           "music ending character script camera").split()

# Small enough to train in seconds, big enough that every stage has real work to do.
TINY_OVERRIDES = [
    "tokenizer.vocab_size=400", "tokenizer.min_frequency=1",
    "lm.n_layer=1", "lm.n_embd=32", "lm.n_head=2", "lm.n_positions=64", "lm.block_size=32",
    "lm.batch_size=4", "lm.steps=6", "lm.warmup_steps=1",
    "generator.block_size=32", "generator.batch_size=4", "generator.steps=4", "generator.warmup_steps=1",
    "classifier.n_layer=1", "classifier.n_embd=32", "classifier.n_head=2", "classifier.max_length=48",
    "classifier.batch_size=16", "classifier.epochs=2", "classifier.warmup_steps=1", "classifier.sst2_repeats=1.0",
    "classifier.bucket_batch_sizes=[]",
    "baseline.min_df=1",
    "eval.ppl_reviews=10", "eval.n_samples=4", "eval.max_new_tokens=8", "eval.gen_batch_size=4",
]
INT8_SAMPLE = 1000  # synthetic IMDB-test reviews for the export's int8 check: one flipped decision moves 0.1 point


def tiny_args(data: Path, out: Path, *extra: str, overrides: list[str] = ()) -> list[str]:
    """``python -m training`` arguments: the tiny preset on ``data`` into ``out``, TINY_OVERRIDES then
    ``overrides`` as ``--set``, then ``extra`` (last, so that an extra --set wins)."""
    args = ["--preset", "tiny", "--data-dir", str(data), "--out", str(out)]
    for item in [*TINY_OVERRIDES, *overrides]:
        args += ["--set", item]
    return args + list(extra)


def review(rng: random.Random, label: int) -> str:
    words = []
    for _ in range(rng.randint(8, 40)):
        pool = (POSITIVE if label == 1 else NEGATIVE) if rng.random() < 0.25 else NEUTRAL
        words.append(rng.choice(pool))
    text = " ".join(words).capitalize() + "."
    return text.replace(" and ", ".<br /><br />And ", 1) if rng.random() < 0.3 else text


def write_split(path: Path, texts: list[str], labels: list[int], text_column: str = "text") -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({text_column: texts, "label": labels}), path)


def make_data_dir(root: Path, seed: int = 0, sizes: dict | None = None) -> Path:
    """imdb/{train,test,unsup}.parquet and sst2/{train,validation}.parquet, sorted by label
    like the real files."""
    rng = random.Random(seed)
    sizes = sizes or {"imdb/train": 160, "imdb/test": 80, "imdb/unsup": 60, "sst2/train": 120, "sst2/validation": 40}
    for key, n in sizes.items():
        if key.endswith("unsup"):
            labels = [-1] * n
            texts = [review(rng, rng.randint(0, 1)) for _ in range(n)]
        else:
            labels = [0] * (n // 2) + [1] * (n - n // 2)
            texts = [review(rng, y) for y in labels]
        write_split(root / f"{key}.parquet", texts, labels)
    return root


# ---- a real server ---------------------------------------------------------------------------------

SERVICE = "service.service:Glowing"
SAMPLING = {"prompt": "This movie", "max_new_tokens": 12, "temperature": 1.0, "top_p": 0.95, "top_k": 50}


class Server(ServedGlowing):
    """The launcher of loadtests/server.py, failing the test instead of raising, with httpx helpers that
    send the API key when the server has one (GLOWING_API_KEY in ``env``). conftest.py's ``server`` and
    ``serve`` fixtures start and stop it."""

    def __init__(self, artifacts: Path | None, log: Path, target: str = SERVICE, cwd: Path = ROOT, **env: str):
        super().__init__(artifacts, log, env, target=target, cwd=cwd)

    def wait_ready(self) -> float:
        try:
            return super().wait_ready()
        except RuntimeError as err:
            pytest.fail(str(err))

    def post(self, path: str, body, headers: dict | None = None, **kw) -> httpx.Response:
        """``body``: a JSON value, or bytes sent as they are."""
        headers = self.headers if headers is None else headers
        if isinstance(body, bytes):
            return httpx.post(f"{self.url}{path}", content=body, headers=headers, timeout=60, **kw)
        return httpx.post(f"{self.url}{path}", json=body, headers=headers, timeout=60, **kw)

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=10).text

    def serves(self) -> bool:
        return self.post("/score", {"texts": ["Still serving?"]}).status_code == 200


# ---- the error envelope ------------------------------------------------------------------------------

LEAKS = re.compile(r"Traceback|File \"|site-packages|/tmp/|/work/|\.py\b|Python/\d|bentoml[ /=-]?v?\d", re.I)


def header(resp, name: str) -> str:
    """A response header from requests/httpx (a string) or schemathesis (a list of strings)."""
    value = resp.headers.get(name) or resp.headers.get(name.title()) or ""
    return value[0] if isinstance(value, list) else value


def envelope_problems(resp) -> list[str]:
    """What is wrong with an error answer: not the JSON envelope, or a leak."""
    import bentoml

    problems = []
    try:
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    except (ValueError, KeyError, TypeError, AssertionError):
        problems.append(f"not the JSON error envelope: {resp.text[:200]!r}")
    if not header(resp, "content-type").startswith("application/json"):
        problems.append(f"content-type {header(resp, 'content-type')!r}")
    for needle in (LEAKS.search(resp.text), bentoml.__version__ in resp.text and bentoml.__version__):
        if needle:
            problems.append(f"leaks {needle.group(0) if hasattr(needle, 'group') else needle!r}: {resp.text[:200]!r}")
    return problems
