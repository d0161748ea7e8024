"""The exported tiny models, built once per session and shared by test_export and test_runtime.

Both modules import ``exported``; the cache below keeps pytest from building it once per module.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import make_data_dir

_CACHE: dict[str, Path] = {}
INT8_SAMPLE = 1000  # synthetic IMDB-test reviews: one flipped decision moves accuracy 0.1 point


@pytest.fixture(scope="session")
def export_data_dir(tmp_path_factory) -> Path:
    """More test reviews than ``tiny_data_dir`` holds, so that the int8 accuracy check is not
    decided by a single borderline review."""
    if "data" not in _CACHE:
        _CACHE["data"] = make_data_dir(tmp_path_factory.mktemp("export-data"), seed=7,
                                       sizes={"imdb/test": INT8_SAMPLE})
    return _CACHE["data"]


@pytest.fixture(scope="session")
def exported(tmp_path_factory, tiny_artifacts, export_data_dir) -> Path:
    """A copy of ``tiny_artifacts`` (left untouched for other tests) with ``onnx/`` exported."""
    if "artifacts" not in _CACHE:
        from export.__main__ import main

        root = tmp_path_factory.mktemp("exported") / "artifacts"
        shutil.copytree(tiny_artifacts, root)
        assert main(["--artifacts", str(root), "--data-dir", str(export_data_dir),
                     "--int8-sample", str(INT8_SAMPLE), "--parity-sample", "64", "--gen-prompts", "6",
                     "--gen-tokens", "12"]) == 0
        _CACHE["artifacts"] = root
    return _CACHE["artifacts"]
