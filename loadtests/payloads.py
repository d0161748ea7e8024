"""Request payloads for the load test: a fixed, seeded sample of IMDB test reviews.

    python -m loadtests.payloads --data-dir ../shared/data --out /tmp/payloads.json

Texts of varied length (short, medium, long reviews) for ``/score`` and prompts made of review
openings (the first few words) for ``/generate`` and ``/reviews``. The sample is written to a small
JSON file that ``locustfile.py`` reads, so the Locust process does no heavy imports. Without a data
folder (tests, a fresh machine) a built-in handful of example texts stands in.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SEED = 1234
N_TEXTS = 256
N_PROMPTS = 64
PROMPT_WORDS = (2, 8)  # a prompt is the first 2 to 8 words of a review

FALLBACK_TEXTS = [
    "Great film.",
    "Awful, boring, a waste of time.",
    "It was fine.<br /><br />Not more, not less: a film you forget on the way home.",
    "I went in expecting little and came out moved. The cast is wonderful and the score stays with you.",
    "The plot makes no sense, the dialogue is wooden and the ending drags on for twenty minutes.",
    " ".join(["The plot was moving and the cast was wonderful."] * 30),
    " ".join(["A tedious, overlong film with nothing to say and no one to say it."] * 20),
    "One of the best performances of the decade. See it on the biggest screen you can find.",
]
FALLBACK_PROMPTS = ["This movie", "I loved", "The acting in this film", "What a", "From the first scene",
                    "My wife and I", "The director", "I have seen this film"]


def default_data_dir() -> Path:
    return Path(os.environ.get("GLOWING_DATA_DIR") or DEFAULT_DATA_DIR)


def sample(data_dir: Path | None, n_texts: int = N_TEXTS, n_prompts: int = N_PROMPTS, seed: int = SEED) -> dict:
    """{"texts": [...], "prompts": [...], "source": ...}: IMDB test reviews from ``data_dir``, or the
    built-in examples when it holds no ``imdb/test.parquet``."""
    path = Path(data_dir) / "imdb" / "test.parquet" if data_dir else None
    if path is None or not path.is_file():
        return {"texts": FALLBACK_TEXTS, "prompts": FALLBACK_PROMPTS, "source": "built-in examples"}
    import pyarrow.parquet as pq

    texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    rng = random.Random(seed)
    # Varied length on purpose: a third each from the short, middle and long thirds by length.
    by_length = sorted(texts, key=len)
    third = len(by_length) // 3
    chosen = []
    for part in (by_length[:third], by_length[third:2 * third], by_length[2 * third:]):
        chosen += rng.sample(part, min(len(part), n_texts // 3 + 1))
    rng.shuffle(chosen)
    chosen = chosen[:n_texts]
    prompts = []
    for text in rng.sample(texts, n_prompts):
        words = text.replace("<br />", " ").split()
        prompts.append(" ".join(words[:rng.randint(*PROMPT_WORDS)]))
    return {"texts": chosen, "prompts": prompts, "source": str(path)}


def write(out: Path, data_dir: Path | None = None) -> dict:
    payloads = sample(data_dir if data_dir is not None else default_data_dir())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payloads))
    return payloads


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=None, help="folder with imdb/test.parquet "
                    "(default: $GLOWING_DATA_DIR or ../shared/data; built-in examples when missing)")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = ap.parse_args(argv)
    p = write(args.out, args.data_dir)
    print(f"{len(p['texts'])} texts, {len(p['prompts'])} prompts from {p['source']} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
