"""Deployment: the export registered in BentoML's model store, `make bento` for both variants, and the
CPU Bento served the way its container serves it (``bentoml serve BENTO_DIR`` with the Bento's own
model store and nothing else). BentoML's home is the session's temporary one (conftest.py).
About 40 s on 2 CPU cores after the tiny export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import httpx
import pytest
import yaml

from export import register
from glowing.artifacts import read_manifest
from support import Server

ROOT = Path(__file__).resolve().parents[1]
BENTOML = [sys.executable, "-m", "bentoml"]
VARIANTS = {"gpu": ("bentofile.yaml", "onnxruntime-gpu[cuda,cudnn]", "cuda"),
            "cpu": ("bentofile.cpu.yaml", "onnxruntime", "cpu")}


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "BENTOML_DO_NOT_TRACK": "True", **env},
                          capture_output=True, text=True, timeout=300)


def store_versions(name: str = register.MODEL_NAME) -> list[str]:
    out = run(BENTOML + ["models", "list", name, "-o", "json"])
    if out.returncode != 0 and f"no Models with name '{name}'" in out.stderr:
        return []
    assert out.returncode == 0, out.stderr
    return sorted(m["tag"] for m in json.loads(out.stdout))


# ---- the model store ----------------------------------------------------------------------------

def test_export_registers_its_files_once_versioned_by_content_with_the_metrics(exported):
    import bentoml

    manifest = read_manifest(exported)
    tag = f"{register.MODEL_NAME}:{register.content_version(manifest)}"
    before = store_versions()
    assert tag in before  # the `exported` fixture's `python -m export` registered it
    assert register.register(exported) == (tag, False)  # the same files again: no new version
    assert store_versions() == before
    model = bentoml.models.get(tag)
    meta = model.info.metadata
    assert meta["preset"] == manifest["preset"] and meta["generator"] == manifest["onnx"]["generator"]["choice"]
    assert meta["generator_trained"] == manifest["models"]["generator"]["source"]
    for key in ("metrics.classifier.imdb_test.accuracy", "metrics.classifier.imdb_test.roc_auc",
                "metrics.generator.positive_test.perplexity", "metrics.export.int8_accuracy",
                "metrics.export.classifier_max_abs_diff_logits"):
        assert meta[key] == pytest.approx(_dotted(manifest["metrics"], key.removeprefix("metrics.")))
    stored = Path(model.path)
    assert read_manifest(stored)["onnx"]["files"] == manifest["onnx"]["files"]
    for rel, entry in manifest["onnx"]["files"].items():
        assert (stored / "onnx" / rel).stat().st_size == entry["bytes"]


def _dotted(data: dict, key: str):
    for part in key.split("."):
        data = data[part]
    return data


def test_version_follows_the_model_files_not_the_timings(exported):
    manifest = read_manifest(exported)
    files = manifest["onnx"]["files"]
    same = {**manifest, "onnx": {**manifest["onnx"], "exported_at": "later", "files": {
        **files, "parity.json": {"sha256": "0" * 64, "bytes": 1}}}}
    assert register.content_version(same) == register.content_version(manifest)
    changed = {**manifest, "onnx": {**manifest["onnx"], "files": {
        **files, "generator/model.onnx": {**files["generator/model.onnx"], "sha256": "1" * 64}}}}
    assert register.content_version(changed) != register.content_version(manifest)


def test_incomplete_export_is_refused_and_registers_nothing(exported, tmp_path):
    import shutil

    root = tmp_path / "artifacts"
    shutil.copytree(exported, root)
    (root / "onnx" / "generator" / "model_fp16.onnx").unlink()
    assert register.main(["--artifacts", str(root), "--name", "glowing-incomplete"]) == 2
    assert store_versions("glowing-incomplete") == []
    with pytest.raises(register.RegisterError, match="model_fp16.onnx is missing"):
        register.register(root, "glowing-incomplete")
    with pytest.raises(register.RegisterError, match="python -m export"):
        register.register(tmp_path / "nothing-exported")


def test_failed_export_registers_nothing_and_no_register_skips_it(monkeypatch, tmp_path):
    import export.__main__ as cli
    from export import parity

    calls = []
    monkeypatch.setattr(register, "register", lambda *a, **k: calls.append(a) or ("glowing-models:x", True))

    def failing(*a, **k):
        raise parity.ParityError("parity does not hold")

    monkeypatch.setattr(cli, "run_export", failing)
    assert cli.main(["--artifacts", str(tmp_path), "--data-dir", str(tmp_path)]) == 1
    report = {"classifier_logits": {"max_abs_diff": 0.0, "reviews": 1}, "generator_greedy": {
        "identical_rows": 1, "prompts": 1}, "int8_accuracy": {"accuracy_int8": 1.0, "accuracy_fp32": 1.0,
                                                               "delta_points": 0.0, "reviews": 1}}
    monkeypatch.setattr(cli, "run_export", lambda *a, **k: report)
    assert cli.main(["--artifacts", str(tmp_path), "--data-dir", str(tmp_path), "--no-register"]) == 0
    assert calls == []
    assert cli.main(["--artifacts", str(tmp_path), "--data-dir", str(tmp_path)]) == 0
    assert calls == [(tmp_path,)]
    assert "--no-register" in cli.parser().format_help()


# ---- the Bentos -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bentos(exported) -> dict[str, Path]:
    """`make bento` with the tiny export: both variants, their directories in the Bento store."""
    venv = Path(sys.executable).parent.parent  # installed already: make must not try to create it
    out = run(["make", "-o", f"{venv}/.installed", "bento", f"ARTIFACTS={exported}", f"VENV={venv}"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    store = Path(os.environ["BENTOML_HOME"]) / "bentos"
    return {v: store / f"glowing-{v}" / (store / f"glowing-{v}" / "latest").read_text().strip() for v in VARIANTS}


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_bento_declares_the_exported_models_and_the_runtime_of_its_variant(bentos, exported, variant):
    bentofile, runtime, device = VARIANTS[variant]
    bento = bentos[variant]
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    tag = f"{register.MODEL_NAME}:{register.content_version(read_manifest(exported))}"
    models = {s["name"]: [m["tag"] for m in s["models"]] for s in info["services"]}
    assert models["glowing-scorer"] == models["glowing-generator"] == [tag]
    assert {e["name"]: e["value"] for e in info["envs"]} == {"GLOWING_MODEL_TAG": "glowing-models:latest",
                                                              "GLOWING_DEVICE": device}
    gpu = {s["name"]: (s["config"].get("resources") or {}).get("gpu") for s in info["services"]}
    assert gpu["glowing-scorer"] == gpu["glowing-generator"] == (0.5 if variant == "gpu" else None)

    requirements = (bento / "env" / "python" / "requirements.txt").read_text().split()
    pins = _pyproject_pins()
    ort_pin = pins["onnxruntime-gpu" if variant == "gpu" else "onnxruntime"]
    assert f"{runtime}=={ort_pin}" in requirements
    for package in ("bentoml", "numpy", "tokenizers", "pydantic", "onnx"):  # onnx: onnx_backend.shared_kv_graph
        assert f"{package}=={pins[package]}" in requirements
    names = {r.split("[")[0].split("=")[0].split(">")[0] for r in requirements}
    assert not names & {"torch", "transformers", "optimum", "optimum-onnx"}  # backend onnx needs none of them
    assert not {"onnxruntime", "onnxruntime-gpu"} <= names  # one import package, one distribution

    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "FROM python:3.11-slim AS base-container" in dockerfile
    assert 'ENTRYPOINT [ "/home/bentoml/bento/env/docker/entrypoint.sh" ]' in dockerfile
    assert "EXPOSE 3000" in dockerfile
    assert "ENV GLOWING_MODEL_TAG=$GLOWING_MODEL_TAG" in dockerfile and f"ARG GLOWING_DEVICE={device}" in dockerfile
    assert 'set -- bentoml serve "$@" "$BENTO_PATH"' in (bento / "env" / "docker" / "entrypoint.sh").read_text()


def _pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [s for extra in project["optional-dependencies"].values() for s in extra]
    return {s.split("==")[0]: s.split("==")[1] for s in specs if "==" in s}


@pytest.fixture(scope="module")
def bento_dir(bentos, tmp_path_factory) -> Path:
    """The CPU Bento as `bentoml containerize` receives it: exported with its models, unpacked."""
    archive = tmp_path_factory.mktemp("bento") / "glowing-cpu.bento"
    out = run(BENTOML + ["export", f"glowing-cpu:{bentos['cpu'].name}", str(archive)])
    assert out.returncode == 0, out.stderr
    target = archive.parent / "bento"
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    return target


@pytest.mark.slow
def test_bento_archive_holds_the_models_and_their_metrics(bento_dir, exported):
    manifest = read_manifest(exported)
    model_dir = bento_dir / "models" / register.MODEL_NAME / register.content_version(manifest)
    info = yaml.safe_load((model_dir / "model.yaml").read_text())
    assert info["metadata"]["metrics.export.int8_accuracy"] == manifest["metrics"]["export"]["int8_accuracy"]
    assert {p.relative_to(model_dir / "onnx").as_posix() for p in (model_dir / "onnx").rglob("*") if p.is_file()} \
        == set(manifest["onnx"]["files"])
    assert (bento_dir / "src" / "service" / "service.py").is_file() and (bento_dir / "src" / "glowing").is_dir()


@pytest.fixture(scope="module")
def served_bento(bento_dir, tmp_path_factory):
    """`bentoml serve BENTO_DIR`, what the container's entrypoint runs, with an empty BentoML home: the
    models can only come from the Bento itself. The environment is the Dockerfile's."""
    home = tmp_path_factory.mktemp("empty-bentoml-home")
    env = {e["name"]: e["value"] for e in yaml.safe_load((bento_dir / "bento.yaml").read_text())["envs"]}
    srv = Server(None, home / "serve.log", target=str(bento_dir), cwd=home, BENTOML_HOME=str(home),
                 PYTHONPATH="", **env)  # PYTHONPATH: the Bento's src/, not this checkout
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.mark.slow
def test_the_bento_serves_its_packed_models_from_its_own_source(served_bento, bento_dir, exported):
    resp = httpx.post(f"{served_bento.url}/score", json={"texts": ["Great film.", "Awful."]}, timeout=30)
    assert resp.status_code == 200 and len(resp.json()["results"]) == 2
    info = httpx.get(f"{served_bento.url}/info", timeout=10).json()
    version = register.content_version(read_manifest(exported))
    assert info["service"]["model_tag"] == f"{register.MODEL_NAME}:{version}"  # :latest, resolved
    assert Path(info["service"]["artifacts"]) == bento_dir / "models" / register.MODEL_NAME / version
    assert info["models"]["classifier"]["providers"] == ["CPUExecutionProvider"]


@pytest.mark.slow
def test_the_service_imports_from_the_bento_source(bento_dir):
    code = "import glowing, service.service as s; print(s.__file__); print(glowing.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=bento_dir / "src", capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": "", "GLOWING_MODEL_TAG": "glowing-models:latest"},
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [Path(p).parent.parent for p in out.stdout.split()] == [bento_dir / "src"] * 2


@pytest.mark.slow
def test_kubernetes_probe_paths_answer_on_the_served_bento(served_bento):
    deployment = next(d for d in yaml.safe_load_all((ROOT / "deploy/k8s/base/deployment.yaml").read_text())
                      if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        path = container[probe]["httpGet"]["path"]
        assert httpx.get(f"{served_bento.url}{path}", timeout=10).status_code == 200, (probe, path)
    assert httpx.get(f"{served_bento.url}/no-such-probe", timeout=10).status_code == 404  # the check can fail


def test_unknown_model_tag_stops_the_server_naming_it(tmp_path, serve):
    srv = serve(tmp_path / "unused", ready=False, GLOWING_MODEL_TAG="glowing-models:nosuchversion")
    code = srv.proc.wait(60)
    srv.stop()
    assert code != 0
    out = srv.output()
    assert "GLOWING_MODEL_TAG=glowing-models:nosuchversion: not in BentoML's model store" in out
    assert "bentoml models list glowing-models" in out


@pytest.mark.slow
def test_one_gpu_pod_places_both_models_on_that_gpu():
    """BentoML's allocator, with one GPU visible: {"gpu": 1} per model service would send the
    second one to a GPU 1 that does not exist."""
    code = """
from _bentoml_impl.server.allocator import ResourceAllocator
import service.service as s
alloc = ResourceAllocator()
alloc.remaining_gpus, alloc._available_gpus = 1, [(1.0, 1.0)]
print([alloc.assign_gpus(svc.config["resources"]["gpu"]) for svc in (s.ScorerService, s.GeneratorService)])
"""
    out = run([sys.executable, "-c", code], GLOWING_DEVICE="cuda")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[[0], [0]]"


@pytest.mark.slow
def test_make_container_without_docker_says_how(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "docker").write_text("#!/bin/sh\nexit 1\n")  # a CLI without an engine, as on this machine
    (fake / "docker").chmod(0o755)
    out = run(["make", "-s", "container"], PATH=f"{fake}:{os.environ['PATH']}")
    assert out.returncode != 0
    assert "no Docker engine" in out.stderr and "bentoml containerize glowing-gpu:latest" in out.stderr


def test_a_damaged_store_model_is_named_with_how_to_replace_it(exported, tmp_path):
    import shutil

    from service import loading
    from service.settings import get_settings

    copy = tmp_path / "store-model"
    shutil.copytree(exported, copy)
    (copy / "onnx" / "classifier" / "model.onnx").write_bytes(b"truncated")
    settings = get_settings(model_tag="glowing-models:abc").model_copy(update={"artifacts": copy})
    with pytest.raises(loading.StartupError, match="model.onnx.*differs from the file the export recorded") as err:
        loading.preflight(settings)
    assert "bentoml models delete glowing-models:abc" in str(err.value) and "make serve" not in str(err.value)
