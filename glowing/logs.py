"""Logging for the command-line entry points (training, export, bench): one format, one place."""

from __future__ import annotations

import logging

NOISY = ("httpx", "urllib3", "filelock", "huggingface_hub")


def configure(verbose: bool = False, quiet: tuple[str, ...] = ()) -> None:
    """INFO (DEBUG with ``verbose``) on the root logger, even if something configured it before;
    third-party chatter and the loggers named in ``quiet`` at WARNING."""
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().setLevel(level)
    for name in NOISY + tuple(quiet):
        logging.getLogger(name).setLevel(logging.WARNING)
