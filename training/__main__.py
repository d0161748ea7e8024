"""Train every Glowing model, stage by stage, into an artifacts directory.

    python -m training --preset tiny --data-dir ../shared/data --out /tmp/glowing-tiny   # smoke run, minutes
    python -m training --data-dir ../shared/data                                         # cpu preset, budget 20 min
    python -m training --preset gpu --data-dir ../shared/data                            # one modern GPU
    python -m training --stages eval-generator --force                                   # one stage again
    python -m training --generator-from gpt2 --classifier-from distilbert-base-uncased   # pretrained (needs the hub)

    python -m training --stages rl,eval-rl                                               # RL tuning (optional)
    torchrun --nproc_per_node 8 -m training --preset gpu --data-dir ../shared/data       # 8 GPUs: DDP, same global batch

Stages, in order: tokenizer, lm, generator, classifier, baseline, eval-classifier, eval-generator,
then the optional rl and eval-rl, which run only when named (`--stages all,rl,eval-rl` runs everything).
A stage whose outputs exist and whose config and inputs are unchanged is skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from glowing import logs
from training import distributed as dist
from training.config import ConfigError, available_presets, load_config
from training.data import DataError
from training.pipeline import Pipeline, StageError
from training.stages import STAGES

OPTIONAL = [name for name, stage in STAGES.items() if stage.optional]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu",
                    help=f"config preset: {', '.join(available_presets())}, or the path of a .toml file "
                         "(default: cpu, at most 20 minutes on 2 CPU cores)")
    ap.add_argument("--data-dir", default=os.environ.get("GLOWING_DATA_DIR"),
                    help="folder holding imdb/{train,test,unsup}.parquet and sst2/{train,validation}.parquet "
                         "(default: $GLOWING_DATA_DIR; without either, the Hugging Face datasets hub)")
    ap.add_argument("--out", default="artifacts", help="artifacts directory to write (default: artifacts)")
    ap.add_argument("--stages", default="all",
                    help=f"comma-separated stages to run, in pipeline order: {', '.join(STAGES)}; 'all' "
                         f"(the default) is every stage but the optional {', '.join(OPTIONAL)}, which run only "
                         "when named (e.g. --stages all,rl,eval-rl). A stage needs its inputs' outputs to exist")
    ap.add_argument("--force", action="store_true", help="rerun the selected stages even if they are up to date")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one config value, e.g. --set lm.steps=500 --set classifier.init=lm "
                         "(repeatable; values use TOML syntax)")
    ap.add_argument("--generator-from", metavar="ID_OR_DIR",
                    help="start the generator from a pretrained causal LM (hub id such as gpt2, or a local "
                         "dir) instead of pretraining one; same as --set lm.init=...")
    ap.add_argument("--classifier-from", metavar="ID_OR_DIR",
                    help="start the classifier from 'scratch', 'lm' (the pretrained LM body) or a pretrained "
                         "model (distilbert-base-uncased, gpt2, a local dir); same as --set classifier.init=...")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.configure(args.verbose)
    overrides = list(args.overrides)
    if args.generator_from:
        overrides.append(f"lm.init={json.dumps(args.generator_from)}")
    if args.classifier_from:
        overrides.append(f"classifier.init={json.dumps(args.classifier_from)}")
    main_rank = True
    try:
        cfg = load_config(args.preset, overrides)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        if "all" in stages:
            stages = [s for s in stages if s != "all"] + [s for s in STAGES if s not in OPTIONAL]
        unknown = [s for s in stages if s not in STAGES]
        if unknown or not stages:
            raise ConfigError(f"--stages: unknown stage(s) {', '.join(unknown) or '(none given)'}; "
                              f"choose from {', '.join(STAGES)}")
        stages = [s for s in STAGES if s in stages]
        started = time.perf_counter()
        dist.init_from_env(cfg.device)  # under torchrun: join the process group
        main_rank = dist.is_main()
        if not main_rank:
            logging.getLogger().setLevel(logging.WARNING)  # rank 0 tells the story
        manifest = Pipeline(cfg, args.out, args.data_dir).run(stages, force=args.force)
    except (ConfigError, DataError, StageError, FileNotFoundError) as err:
        logging.getLogger("training").error("%s", err)
        return 2
    finally:
        dist.shutdown()
    if not main_rank:
        return 0
    logging.getLogger("training").info("pipeline done in %.1f s; manifest: %s/manifest.json",
                                       time.perf_counter() - started, args.out)
    _print_headline(manifest)
    return 0


def _print_headline(manifest: dict) -> None:
    from glowing.artifacts import flatten

    metrics = flatten(manifest.get("metrics", {}))
    keys = ["classifier.imdb_test.accuracy", "classifier.imdb_test.roc_auc", "classifier.sst2_validation.accuracy",
            "baseline.imdb_test.accuracy", "generator.positive_test.perplexity", "generator.samples.mean_p_positive",
            "generator.samples.judge_mean_p_positive", "generator.samples.distinct_2",
            "rl.finetuned.judge_mean_p_positive", "rl.tuned.judge_mean_p_positive", "rl.finetuned.distinct_2",
            "rl.tuned.distinct_2", "rl.tuned.kl_to_finetuned"]
    for key in keys:
        if key in metrics:
            print(f"{key:45s} {metrics[key]:.4f}")


if __name__ == "__main__":
    sys.exit(main())
