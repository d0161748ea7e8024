"""Shared fixtures: tiny synthetic data in the shared-data layout, tiny trained artifacts, their ONNX
export, and real ``bentoml serve`` processes of it (the helpers behind them: tests/support.py).

Everything is offline; nothing here reads ../shared or the hub. The data and the models are built once
per session, in seconds. A test that starts a server or another subprocess, or trains or benchmarks end
to end, is marked ``slow``: ``make test-fast`` (``pytest -m "not slow"``, under a minute on 2 cores) leaves
those out, ``make test`` runs everything.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from support import INT8_SAMPLE, SERVICE, Server, make_data_dir, tiny_args

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# BentoML's home (model store, Bentos) for this session only: the export registers its models and
# the Bento tests build, and none of it may land in the user's ~/bentoml. Set before anything
# imports bentoml, which reads it once; `bentoml serve` subprocesses inherit it.
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="glowing-test-bentoml-")
atexit.register(shutil.rmtree, os.environ["BENTOML_HOME"], ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory, tiny_data_dir) -> Path:
    """A complete artifacts directory from the tiny preset on tiny data (about 5-10 s)."""
    from training.__main__ import main

    out = tmp_path_factory.mktemp("artifacts")
    assert main(tiny_args(tiny_data_dir, out)) == 0
    return out


@pytest.fixture(scope="session")
def export_data_dir(tmp_path_factory) -> Path:
    """More test reviews than ``tiny_data_dir`` holds, so that the int8 accuracy check is not
    decided by a single borderline review."""
    return make_data_dir(tmp_path_factory.mktemp("export-data"), seed=7, sizes={"imdb/test": INT8_SAMPLE})


@pytest.fixture(scope="session")
def exported(tmp_path_factory, tiny_artifacts, export_data_dir) -> Path:
    """A copy of ``tiny_artifacts`` (left untouched for other tests) with ``onnx/`` exported."""
    from export.__main__ import main

    root = tmp_path_factory.mktemp("exported") / "artifacts"
    shutil.copytree(tiny_artifacts, root)
    assert main(["--artifacts", str(root), "--data-dir", str(export_data_dir), "--int8-sample", str(INT8_SAMPLE),
                 "--parity-sample", "64", "--gen-prompts", "6", "--gen-tokens", "12"]) == 0
    return root


# ---- real servers ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(request, exported, tmp_path_factory):
    """One ``bentoml serve`` of the exported tiny models for a test module, ready. The module sets it up:
    ``SERVER_ENV`` (environment variables, e.g. ``{"GLOWING_API_KEY": ...}``) and ``SERVER_TARGET`` (the
    service to serve, default ``service.service:Glowing``; e.g. ``tests.patched_service:Glowing``)."""
    env = getattr(request.module, "SERVER_ENV", {})
    target = getattr(request.module, "SERVER_TARGET", SERVICE)
    name = request.module.__name__.rpartition(".")[2]
    srv = Server(exported, tmp_path_factory.mktemp(name) / "serve.log", target=target, **env)
    try:
        srv.ready_after_s = srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def serve(tmp_path):
    """``serve(artifacts, target=..., ready=True, **env)``: a server of the test's own, ready unless
    ``ready`` is false (a start-up that must fail); every one is stopped after the test."""
    started: list[Server] = []

    def start(artifacts: Path, target: str = SERVICE, ready: bool = True, **env: str) -> Server:
        srv = Server(artifacts, tmp_path / f"serve-{len(started)}.log", target=target, **env)
        started.append(srv)
        if ready:
            srv.wait_ready()
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
def loaded_splits(monkeypatch) -> list[str]:
    """The "dataset/split" names that training.pipeline loads during the test, in order."""
    import training.pipeline as pl

    loaded, real = [], pl.load_split

    def spy(data_dir, dataset, split, seed):
        loaded.append(f"{dataset}/{split}")
        return real(data_dir, dataset, split, seed)

    monkeypatch.setattr(pl, "load_split", spy)
    return loaded


SERVER_FIXTURES = {"server", "serve"}


def pytest_collection_modifyitems(items):
    """A test that starts a real server is slow, whether or not its module says so."""
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
