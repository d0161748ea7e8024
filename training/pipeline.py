"""The pipeline: the stages of ``training.stages.STAGES`` in order, each skipped when its outputs exist
and are up to date.

A stage writes into a temporary folder and replaces its output folder only on success, so a
failure leaves earlier outputs intact. A stage's fingerprint covers its config section, the
data checksums and its inputs' fingerprints: change one and that stage and those after it rerun.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
from datetime import datetime, timezone
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import Any

from glowing import artifacts as A
from training import distributed as dist
from training.config import Config
from training.data import Split, data_files, load_split, sst2_holdout_split, train_val_split
from training.stages import STAGES

log = logging.getLogger(__name__)

STAGE_RECORD = "stage.json"
PACKAGES = ("torch", "transformers", "tokenizers", "scikit-learn", "numpy", "optimum", "onnx", "onnxruntime",
            "bentoml", "pydantic")


class StageError(RuntimeError):
    pass


class Pipeline:
    def __init__(self, cfg: Config, out: str | Path, data_dir: str | Path | None):
        self.cfg = cfg
        self.out = Path(out)
        self.data_dir = Path(data_dir) if data_dir else None
        self._splits: dict[str, Split] = {}

    # ---- data -----------------------------------------------------------------------------
    def split(self, key: str) -> Split:
        if key not in self._splits:
            dataset, name = key.split("/")
            self._splits[key] = load_split(self.data_dir, dataset, name, self.cfg.seed)
        return self._splits[key]

    @cached_property
    def train_val(self) -> tuple[Split, Split]:
        train = self.split("imdb/train").head(self.cfg.data.max_train)
        return train_val_split(train, self.cfg.data.val_fraction, self.cfg.seed)

    @property
    def fit(self) -> Split:
        return self.train_val[0]

    @property
    def val(self) -> Split:
        return self.train_val[1]

    @cached_property
    def sst2_train_val(self) -> tuple[Split, Split]:
        """SST-2 train, cleaned, minus a held-out set of its sentences (SST-2 validation stays unseen)."""
        d = self.cfg.data
        return sst2_holdout_split(self.split("sst2/train"), d.sst2_holdout, d.sst2_holdout_min_words, self.cfg.seed)

    @cached_property
    def unsup(self) -> Split:
        return self.split("imdb/unsup").head(self.cfg.data.max_unsup)

    @cached_property
    def imdb_test(self) -> Split:
        return self.split("imdb/test").head(self.cfg.data.max_test)

    @cached_property
    def checksums(self) -> dict[str, str]:
        if self.data_dir is None:
            return {"source": "huggingface hub"}
        return {name: A.sha256_file(path) for name, path in data_files(self.data_dir).items() if path.exists()}

    # ---- bookkeeping ----------------------------------------------------------------------
    def path(self, stage: str) -> Path:
        return self.out / STAGES[stage].output

    def record(self, stage: str) -> dict | None:
        path = self.path(stage) / STAGE_RECORD
        return json.loads(path.read_text()) if path.exists() else None

    def fingerprint(self, stage: str) -> str:
        upstream = {}
        for dep in STAGES[stage].inputs_for(self.cfg):
            rec = self.record(dep)
            if rec is None:
                raise StageError(f"stage {stage!r} needs the output of stage {dep!r}, which is missing in "
                                 f"{self.path(dep)}: run `python -m training --stages {dep} --out {self.out}` "
                                 "(or the whole pipeline) first")
            upstream[dep] = rec["fingerprint"]
        payload = {"config": STAGES[stage].config_for(self.cfg), "data": self.checksums, "inputs": upstream}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def write_header(self) -> None:
        versions = {}
        for name in PACKAGES:
            try:
                versions[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                pass
        self.out.mkdir(parents=True, exist_ok=True)
        A.write_json_atomic(self.out / A.CONFIG, self.cfg.to_dict())
        manifest = A.read_manifest(self.out)
        manifest.update({
            "preset": self.cfg.preset,
            "config": self.cfg.to_dict(),
            "versions": {"python": platform.python_version(), **versions},
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "data": {"dir": str(self.data_dir) if self.data_dir else None, "sha256": self.checksums},
        })
        A.write_json_atomic(self.out / A.MANIFEST, manifest)

    # ---- running --------------------------------------------------------------------------
    def run(self, stages: list[str], force: bool = False) -> dict[str, Any]:
        one_process = [s for s in stages if STAGES[s].one_process]
        if dist.world_size() > 1 and one_process:
            names = ",".join(one_process)
            raise StageError(f"{names}: these stages run in one process (TRL drives its own devices): run them "
                             f"without torchrun, e.g. python -m training --stages {names}")
        if dist.is_main():
            self.write_header()
        for stage in stages:
            self.run_stage(stage, force)
        return A.read_manifest(self.out)

    def run_stage(self, stage: str, force: bool) -> None:
        fingerprint = self.fingerprint(stage)
        rec = self.record(stage)
        if rec and rec["fingerprint"] == fingerprint and not force:
            log.info("stage %-15s up to date (%s), skipped; --force reruns it", stage, self.path(stage))
            return
        if rec and not force:
            log.info("stage %-15s inputs or config changed since the last run: rerunning", stage)
        log.info("stage %-15s starts -> %s", stage, self.path(stage))
        # Only rank 0 writes: the other ranks see its folders after the barriers (one host, one disk).
        main = dist.is_main()
        final = self.path(stage)
        tmp = final.with_name(f".{final.name}.tmp")
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        started, cpu_started = time.perf_counter(), time.process_time()
        patch = {}
        try:
            if main or STAGES[stage].distributed:
                patch = STAGES[stage].run(self, tmp) or {}
        except BaseException:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            log.error("stage %s failed; earlier outputs in %s are untouched", stage, self.out)
            raise
        seconds = time.perf_counter() - started
        # CPU seconds of this process (all its threads): on a machine shared with other work the wall
        # time stretches, this does not; on an idle 2-core machine wall ~= cpu_seconds / 2.
        cpu_seconds = time.process_time() - cpu_started
        if main:
            self._publish(stage, tmp, final, fingerprint, seconds, cpu_seconds, patch)
        dist.barrier()
        log.info("stage %-15s done in %.1f s", stage, seconds)

    def _publish(self, stage: str, tmp: Path, final: Path, fingerprint: str, seconds: float, cpu_seconds: float,
                 patch: dict) -> None:
        A.write_json_atomic(tmp / STAGE_RECORD, {
            "stage": stage, "fingerprint": fingerprint, "seconds": round(seconds, 2),
            "cpu_seconds": round(cpu_seconds, 2),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        A.update_manifest(self.out, {"stages": {stage: {"seconds": round(seconds, 2),
                                                        "cpu_seconds": round(cpu_seconds, 2),
                                                        "fingerprint": fingerprint}}, **patch})


__all__ = ["Pipeline", "StageError"]
