"""Register an export in BentoML's model store: the unit that a Bento packs and a service serves.

    python -m export.register --artifacts artifacts        # what `python -m export` does at its end
    bentoml models list glowing-models                     # the registered versions
    bentoml models get glowing-models:latest -o yaml       # one version's metrics (metadata)

One model, ``glowing-models``, holds what the service reads with backend onnx, laid out as an
artifacts directory: ``manifest.json`` and ``onnx/`` (both models in every precision, their
tokenizers and configs, parity.json). One model rather than one per network because an export
is released as a whole: the parity checks, the manifest and the int8 calibration are shared.

The version is the first 16 hex digits of a sha256 over the model files' own sha256 (the ones
the export recorded in the manifest; parity.json is left out, it holds timings), so the same
files registered twice are one version, and a new export with new weights is a new version.
The metadata holds the manifest's metrics (accuracy, AUC, perplexity, judge P(positive), parity
figures) under their dotted keys, the preset and where the generator came from. The store is
BentoML's (``$BENTOML_HOME``, default ``~/bentoml``). Takes a few seconds (it copies the files).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import sys
from pathlib import Path

from glowing import artifacts as A
from glowing import logs

MODEL_NAME = "glowing-models"
UNHASHED = {"parity.json"}  # records timings: identical weights would get a new version each export
log = logging.getLogger("export")


class RegisterError(RuntimeError):
    """The artifacts hold no complete export to register; the message says which file and why."""


def content_version(manifest: dict) -> str:
    """The deterministic version of an export: from the sha256 of its model files."""
    files = manifest.get(A.ONNX, {}).get("files") or {}
    hashed = sorted((rel, entry["sha256"]) for rel, entry in files.items() if Path(rel).name not in UNHASHED)
    if not hashed:
        raise RegisterError("manifest.json records no exported ONNX files (key 'onnx.files'); run "
                            "`python -m export` first")
    return hashlib.sha256("".join(f"{rel}\0{sha}\n" for rel, sha in hashed).encode()).hexdigest()[:16]


def metadata(manifest: dict) -> dict:
    """What `bentoml models get` shows: the metrics under their stable dotted keys, and the provenance."""
    onnx = manifest.get(A.ONNX, {})
    served = onnx.get("generator") or {}  # which trained generator was exported (finetuned or rl)
    return {"preset": manifest.get("preset"), "generator": served.get("choice", A.GENERATOR),
            "generator_trained": served.get("trained") or manifest.get("models", {}).get(A.GENERATOR, {}).get("source"),
            "exported_at": onnx.get("exported_at"), "int8_isa": onnx.get("int8_isa"),
            "onnxruntime": onnx.get("versions", {}).get("onnxruntime"), "opset": onnx.get("opset"),
            **{f"metrics.{k}": v for k, v in A.flatten(manifest.get("metrics", {})).items()
               if isinstance(v, (int, float, str, bool))}}


def check_files(artifacts: Path, manifest: dict) -> None:
    """Every file the manifest records is there with its size: a half-copied export is refused."""
    for rel, entry in manifest[A.ONNX]["files"].items():
        path = artifacts / A.ONNX / rel
        if not path.is_file():
            raise RegisterError(f"{path} is missing (recorded in {artifacts / A.MANIFEST}); run "
                                f"`python -m export --artifacts {artifacts}` again")
        if path.stat().st_size != entry["bytes"]:
            raise RegisterError(f"{path} is {path.stat().st_size} bytes, the export recorded {entry['bytes']}; "
                                f"run `python -m export --artifacts {artifacts}` again")


def register(artifacts: str | Path, name: str = MODEL_NAME) -> tuple[str, bool]:
    """Register ``artifacts``' export as ``name:<content version>``; returns (tag, created).

    An existing version is left as it is (created is False): its files are the same by construction."""
    import bentoml
    from bentoml.exceptions import NotFound

    artifacts = Path(artifacts)
    manifest = A.read_manifest(artifacts)
    tag = f"{name}:{content_version(manifest)}"
    check_files(artifacts, manifest)
    try:
        bentoml.models.get(tag)
        return tag, False
    except NotFound:
        pass
    labels = {"project": "glowing"}
    if str(manifest.get("preset", "")).isidentifier():
        labels["preset"] = manifest["preset"]
    with bentoml.models.create(tag, labels=labels, metadata=metadata(manifest)) as model:
        shutil.copy2(artifacts / A.MANIFEST, model.path_of(A.MANIFEST))
        shutil.copytree(artifacts / A.ONNX, model.path_of(A.ONNX), dirs_exist_ok=True)
    return tag, True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.register", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", default="artifacts",
                    help="artifacts directory holding manifest.json and the export's onnx/ (default: artifacts)")
    ap.add_argument("--name", default=MODEL_NAME, help=f"model name in the store (default: {MODEL_NAME})")
    ap.add_argument("-q", "--quiet", action="store_true",
                    help="print only the tag, for scripts (`make bento` builds the Bento from it)")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = ap.parse_args(argv)
    logs.configure(args.verbose)
    try:
        tag, created = register(args.artifacts, args.name)
    except (RegisterError, ValueError) as err:
        log.error("%s", err)
        return 2
    print(tag if args.quiet else f"{'registered' if created else 'already registered'}: {tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
