"""Print a markdown summary of a trained artifacts directory: metrics and time per stage.

    python -m training.summary artifacts

The results table of docs/TRAINING.md is this command's output after ``make models``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from glowing.artifacts import flatten, read_manifest

ROWS = [
    ("classifier.imdb_test.accuracy", "classifier accuracy, IMDB test"),
    ("classifier.imdb_test.f1", "classifier F1, IMDB test"),
    ("classifier.imdb_test.roc_auc", "classifier ROC AUC, IMDB test"),
    ("classifier.sst2_validation.accuracy", "classifier accuracy, SST-2 validation"),
    ("classifier.sst2_validation.roc_auc", "classifier ROC AUC, SST-2 validation"),
    ("baseline.imdb_test.accuracy", "TF-IDF baseline accuracy, IMDB test"),
    ("baseline.imdb_test.roc_auc", "TF-IDF baseline ROC AUC, IMDB test"),
    ("baseline.sst2_validation.accuracy", "TF-IDF baseline accuracy, SST-2 validation"),
    ("generator.positive_test.perplexity", "generator perplexity, positive IMDB test reviews"),
    ("generator.samples.this_movie.mean_p_positive", "\"This movie\" samples: mean P(positive), classifier"),
    ("generator.samples.this_movie.judge_mean_p_positive", "\"This movie\" samples: mean P(positive), TF-IDF judge"),
    ("generator.samples.test_prefixes.mean_p_positive", "test-prefix samples: mean P(positive), classifier"),
    ("generator.samples.test_prefixes.judge_mean_p_positive", "test-prefix samples: mean P(positive), TF-IDF judge"),
    ("generator.samples.mean_p_positive", "all 200 samples: mean P(positive), classifier"),
    ("generator.samples.judge_mean_p_positive", "all 200 samples: mean P(positive), TF-IDF judge"),
    ("generator.samples.distinct_2", "all 200 samples: distinct-2"),
    ("rl.finetuned.judge_mean_p_positive", "RL eval, fine-tuned generator: mean P(positive), TF-IDF judge"),
    ("rl.tuned.judge_mean_p_positive", "RL eval, tuned generator: mean P(positive), TF-IDF judge"),
    ("rl.finetuned.distinct_2", "RL eval, fine-tuned generator: distinct-2"),
    ("rl.tuned.distinct_2", "RL eval, tuned generator: distinct-2"),
    ("rl.tuned.kl_to_finetuned", "RL eval, tuned generator: KL to the fine-tuned one (nats per sample)"),
]


def summary(root: str) -> str:
    manifest = read_manifest(root)
    if not manifest:
        raise SystemExit(f"{root}/manifest.json is missing: run `python -m training --out {root}` first")
    metrics = flatten(manifest.get("metrics", {}))
    lines = [f"Preset `{manifest.get('preset')}`, {manifest.get('machine', {}).get('cpus')} CPUs "
             f"({manifest.get('machine', {}).get('platform', '?')}).", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {label} | {metrics[key]:.4f} |" for key, label in ROWS if key in metrics]
    lines += by_length(root)
    stages = manifest.get("stages", {})
    total = sum(s["seconds"] for s in stages.values())
    cpu = sum(s.get("cpu_seconds", 0.0) for s in stages.values())
    models = manifest.get("models", {})
    lines += ["", "| stage | seconds | CPU seconds | training steps |", "|---|---|---|---|"]
    lines += [f"| {name} | {s['seconds']:.0f} | " + (f"{s['cpu_seconds']:.0f}" if "cpu_seconds" in s else "n/a")
              + f" | {steps(models.get(name, {}))} |" for name, s in stages.items()]
    lines.append(f"| **total** | **{total:.0f}** ({total / 60:.1f} min) | {cpu:.0f} | |")
    return "\n".join(lines)


def steps(model: dict) -> str:
    """``200``, or ``170 of 200 (time limit)`` when the stage's max_minutes cut its plan."""
    done, planned = model.get("steps"), model.get("planned_steps")
    if done is None:
        return ""
    return f"{done} of {planned} (time limit)" if planned and done < planned else f"{done}"


def by_length(root: str) -> list[str]:
    """Accuracy by text length (words), from eval-classifier's report, when it exists."""
    path = Path(root) / "reports/classifier/classifier.json"
    if not path.exists():
        return []
    report = json.loads(path.read_text())
    lines = ["", "| accuracy by length | words | n | classifier | TF-IDF baseline |", "|---|---|---|---|---|"]
    for key, rows in report.get("by_length", {}).items():
        lines += [f"| {key} | {r['words']} | {r['n']:,} | {r['classifier']:.4f} | {r['baseline']:.4f} |"
                  for r in rows]
    return lines if len(lines) > 3 else []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.summary", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="?", default="artifacts", help="artifacts directory (default: artifacts)")
    print(summary(ap.parse_args(argv).artifacts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
