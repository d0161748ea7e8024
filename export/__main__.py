"""Export the trained classifier and generator to ONNX, with int8 and fp16 variants, and prove parity.

    python -m export --artifacts artifacts --data-dir ../shared/data     # cpu-preset models: about 30 s
    python -m export --artifacts /tmp/g-tiny --int8-sample 1000         # tiny models: about 20 s
    python -m export --generator rl                                     # serve the RL-tuned generator

Writes ARTIFACTS/onnx/:
    classifier/model.onnx            fp32: the scoring graph rebuilt so that its last layer computes the pooled
                                     position only (export/classifier_graph.py; for a classifier it does not
                                     cover, Optimum's with attention fused for ORT, export/fuse.py)
                                     (+ tokenizer, config, max_length.txt)
    classifier/model_quantized.onnx  dynamic int8 (CPU; --int8-isa) of that graph
    classifier/model_fp16.onnx       fp16 (GPU), float32 inputs/outputs, plain ONNX ops
    generator/model.onnx             fp32: one decoding graph with the KV cache, rebuilt on ORT's fused
                                     operators (export/decoder_graph.py; Optimum's graph for a non-GPT-2)
    generator/model_quantized.onnx   int8 (CPU) of the rebuilt graph: 8-bit weight blocks, int8 products per
                                     row (batch-independent); perplexity within 2% of fp32
    generator/model_fp16.onnx        fp16 (GPU), KV cache in fp16, from Optimum's graph (plain ONNX ops)
    parity.json                      the parity checks (see export/parity.py)
and records the files (sha256, bytes) under ``onnx`` in ARTIFACTS/manifest.json, the parity
figures under ``metrics.export``. Everything is built in a temporary folder and swapped in only
when every parity check holds: a failed export leaves the previous onnx/ intact and its
output, parity.json included, in ARTIFACTS/onnx.failed/ for inspection. Exit status 1 then.
A successful export is then registered in BentoML's model store as glowing-models:<content hash>
(export/register.py; --no-register skips it); a failed one registers nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from export import classifier_graph, decoder_graph, fuse, onnx_export, parity, quantize
from export.onnx_export import ExportError
from export.labelled_reviews import ReviewDataError, load_imdb_test
from glowing import artifacts as A
from glowing import logs
from glowing.runtime import ModelFileError

log = logging.getLogger("export")


def default_data_dir() -> str | None:
    if os.environ.get("GLOWING_DATA_DIR"):
        return os.environ["GLOWING_DATA_DIR"]
    return "../shared/data" if Path("../shared/data/imdb/test.parquet").is_file() else None


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", default="artifacts",
                    help="artifacts directory written by `python -m training` (default: artifacts)")
    ap.add_argument("--data-dir", default=default_data_dir(),
                    help="folder holding imdb/test.parquet: the real reviews of the parity checks (default: "
                         "$GLOWING_DATA_DIR, else ../shared/data when it exists; required)")
    ap.add_argument("--int8-sample", type=int, default=5000, metavar="N",
                    help="IMDB test reviews (fixed seeded sample) on which int8 accuracy must stay within "
                         "0.5 points of fp32 (default: 5000; 0 = all 25,000)")
    ap.add_argument("--parity-sample", type=int, default=256, metavar="N",
                    help="IMDB test reviews whose fp32 ONNX and PyTorch logits are compared (default: 256)")
    ap.add_argument("--gen-prompts", type=int, default=8, metavar="N",
                    help="left-padded prompts (openings of real reviews) for the greedy generation check "
                         "(default: 8)")
    ap.add_argument("--gen-tokens", type=int, default=32, metavar="N",
                    help="new tokens per prompt in the greedy generation check (default: 32)")
    ap.add_argument("--int8-isa", choices=quantize.INT8_ISAS, default="auto",
                    help="int8 kernel family: avx2 (u8 weights, safe on any x86-64 CPU) or avx512_vnni (s8 "
                         "weights, much faster where the CPU has VNNI); auto picks avx512_vnni when this CPU "
                         "has AVX-512 VNNI or AVX-VNNI (default: auto). Quantize on the kind of CPU that serves")
    ap.add_argument("--generator", choices=tuple(onnx_export.GENERATORS), default="finetuned",
                    help="which trained generator to export and so serve: finetuned (ARTIFACTS/generator, what "
                         "`make models` builds) or rl (ARTIFACTS/rl, from `make rl`). Default: finetuned, the one "
                         "every artifacts directory has; the choice is recorded as onnx.generator in the manifest")
    ap.add_argument("--seed", type=int, default=0, help="seed of the review samples (default: 0)")
    ap.add_argument("--no-register", dest="register", action="store_false",
                    help="do not register the export in BentoML's model store (registered by default, as "
                         "glowing-models:<content hash>, once every parity check holds; see export/register.py)")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return ap


def run_export(artifacts: Path, data_dir: str | None, *, int8_sample: int = 5000, parity_sample: int = 256,
               gen_prompts: int = 8, gen_tokens: int = 32, seed: int = 0, int8_isa: str = "auto",
               generator: str = "finetuned") -> dict:
    """Export, check parity, swap ``artifacts/onnx`` in, update the manifest; returns parity.json."""
    started = time.perf_counter()
    onnx_export.check_sources(artifacts, generator)
    reviews = load_imdb_test(data_dir)  # before any work: no data, no export
    staging = Path(tempfile.mkdtemp(prefix=".onnx-", dir=artifacts))
    staging.chmod(0o755)  # mkdtemp makes it private; the service may run as another user
    try:
        for kind in onnx_export.TASKS:
            log.info("exporting %s (task %s)", kind, onnx_export.TASKS[kind])
            onnx_export.export_model(artifacts, kind, staging / kind, generator)
        log.info("converting both models to fp16")
        quantize.convert_fp16(staging / A.CLASSIFIER, keep_io_types=True)  # from the plain graph: any provider
        quantize.convert_fp16(staging / A.GENERATOR, keep_io_types=False)
        heads = json.loads((staging / A.CLASSIFIER / "config.json").read_text()).get("n_head")
        fused = fuse.fuse_gpt2_attention(staging / A.CLASSIFIER / "model.onnx", heads) if heads else 0
        log.info("rebuilding the classifier's scoring graph: its last layer at the pooled position only")
        last_position = classifier_graph.build(onnx_export.source_dir(artifacts, A.CLASSIFIER),
                                               staging / A.CLASSIFIER / "model.onnx")
        isa = quantize.detect_isa() if int8_isa == "auto" else int8_isa
        log.info("quantizing the classifier to dynamic int8 (%s)", isa)
        quantize.quantize_int8(staging / A.CLASSIFIER, isa)
        # Optimum's generator graph gave fp16 above (plain ops); fp32 and int8 serve the rebuilt one.
        log.info("rebuilding the generator's decoding graph on ORT's fused operators")
        rebuilt = decoder_graph.build(onnx_export.source_dir(artifacts, A.GENERATOR, generator),
                                      staging / A.GENERATOR / "model.onnx")
        if rebuilt:
            log.info("quantizing the generator's weights to int8 blocks (MatMulNBits)")
            quantize.quantize_generator_int8(staging / A.GENERATOR)
        log.info("parity checks on %s", reviews.origin)
        report = parity.run_all(staging, artifacts, reviews, parity_sample=parity_sample, int8_sample=int8_sample,
                                gen_prompts=gen_prompts, gen_tokens=gen_tokens, seed=seed,
                                generator_source=onnx_export.source_dir(artifacts, A.GENERATOR, generator))
        report["classifier_fused_attention_layers"], report["int8_isa"] = fused, isa
        report["generator_graph"] = "fused" if rebuilt else "optimum"
        report["classifier_graph"] = "last-position" if last_position else ("fused" if fused else "optimum")
        A.write_json_atomic(staging / "parity.json", report)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not report["passed"]:
        failed = artifacts / f"{A.ONNX}.failed"
        shutil.rmtree(failed, ignore_errors=True)
        staging.rename(failed)
        raise parity.ParityError("parity does not hold, nothing was replaced; see "
                                 f"{failed / 'parity.json'}:\n  " + "\n  ".join(parity.failures(report)))
    _swap_in(staging, artifacts / A.ONNX)
    _record(artifacts, report, time.perf_counter() - started, generator)
    return report


def _swap_in(staging: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}-old-{os.getpid()}")
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old)


def _record(artifacts: Path, report: dict, seconds: float, generator: str = "finetuned") -> None:
    import onnx
    import onnxruntime
    import optimum.version

    root = artifacts / A.ONNX
    files = {str(p.relative_to(root)): {"sha256": A.sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(root.rglob("*")) if p.is_file()}
    clf, gen, int8 = report["classifier_logits"], report["generator_greedy"], report["int8_accuracy"]
    metrics = {"classifier_max_abs_diff_logits": clf["max_abs_diff"],
               "generator_greedy_identical_rows": gen["identical_rows"], "generator_greedy_prompts": gen["prompts"],
               "int8_accuracy": int8["accuracy_int8"], "fp32_accuracy": int8["accuracy_fp32"],
               "int8_delta_points": int8["delta_points"], "int8_reviews": int8["reviews"],
               "fp16_classifier_max_abs_diff_p": report["fp16"]["classifier_max_abs_diff_p"]}
    manifest = A.read_manifest(artifacts)
    manifest[A.ONNX] = {  # replaced whole: files of an earlier export must not linger
        "dir": A.ONNX, "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tasks": dict(onnx_export.TASKS), "opset": _opset(root / A.GENERATOR / "model.onnx"),
        "versions": {"optimum": optimum.version.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__},
        "int8_isa": report["int8_isa"], "parity": f"{A.ONNX}/parity.json",
        "classifier_fused_attention_layers": report["classifier_fused_attention_layers"],
        "generator_graph": report["generator_graph"], "classifier_graph": report["classifier_graph"],
        "generator": _served_generator(manifest, generator), "files": files}
    A.write_json_atomic(artifacts / A.MANIFEST, manifest)
    A.update_manifest(artifacts, {"metrics": {"export": metrics},
                                  "stages": {"export": {"seconds": round(seconds, 1)}}})


def _served_generator(manifest: dict, generator: str) -> dict:
    """Which trained generator onnx/generator holds: /info and the manifest say which one is served."""
    stage = onnx_export.GENERATORS[generator]
    return {"choice": generator, "dir": stage, "trained": manifest.get("models", {}).get(stage, {}).get("source"),
            "fingerprint": manifest.get("stages", {}).get(stage, {}).get("fingerprint")}


def _opset(path: Path) -> int:
    import onnx

    return next(o.version for o in onnx.load(path).opset_import if o.domain in ("", "ai.onnx"))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.configure(args.verbose, quiet=("optimum", "transformers"))
    for flag in ("int8_sample", "parity_sample", "gen_prompts", "gen_tokens"):
        if getattr(args, flag) < (0 if flag == "int8_sample" else 1):
            log.error("--%s=%d: must be >= %d", flag.replace("_", "-"), getattr(args, flag),
                      0 if flag == "int8_sample" else 1)
            return 2
    artifacts = Path(args.artifacts)
    try:
        report = run_export(artifacts, args.data_dir, int8_sample=args.int8_sample,
                            parity_sample=args.parity_sample, gen_prompts=args.gen_prompts,
                            gen_tokens=args.gen_tokens, seed=args.seed, int8_isa=args.int8_isa,
                            generator=args.generator)
    except (ExportError, ReviewDataError, ModelFileError) as err:
        log.error("%s", err)
        return 2
    except parity.ParityError as err:
        log.error("%s", err)
        return 1
    clf, gen, int8 = report["classifier_logits"], report["generator_greedy"], report["int8_accuracy"]
    print(f"classifier logits max |ONNX - PyTorch|   {clf['max_abs_diff']:.2e}"
          f"  (<= {parity.LOGITS_ATOL:g}, {clf['reviews']} reviews)")
    print(f"generator greedy tokens identical        {gen['identical_rows']}/{gen['prompts']} prompts")
    print(f"int8 accuracy vs fp32                    {int8['accuracy_int8']:.4f} vs {int8['accuracy_fp32']:.4f}"
          f"  ({int8['delta_points']:+.2f} points, {int8['reviews']} reviews)")
    print(f"generator exported                       {args.generator} ({artifacts / onnx_export.GENERATORS[args.generator]})")
    print(f"written: {artifacts / A.ONNX}/ (parity.json, manifest key 'onnx')")
    return _register(artifacts) if args.register else 0


def _register(artifacts: Path) -> int:
    """After parity held: the export is in place whatever happens here, so a failure says how to retry."""
    from export import register

    try:
        tag, created = register.register(artifacts)
    except Exception as err:  # noqa: BLE001  (store not writable, disk full...): the export itself stands
        log.error("the export is in %s, but registering it in BentoML's model store failed: %s; retry with "
                  "`python -m export.register --artifacts %s`", artifacts / A.ONNX, err, artifacts)
        return 1
    print(f"model store: {tag} ({'registered' if created else 'already registered, same files'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
