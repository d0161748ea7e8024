"""``python -m loadtests.engine_inprocess`` on the tiny export, and the serving benchmark's new modes."""

from __future__ import annotations

import pytest

from glowing.runtime import engine as engine_module


def test_engine_against_request_level_batches_prints_every_contender(exported, capsys):
    from loadtests.engine_inprocess import main

    before = engine_module.CALL_POSITIONS
    assert main(["--artifacts", str(exported), "--users", "3", "--seconds", "0.3", "--repeats", "1",
                 "--call-positions", "64,512"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| engine")
            or line.startswith("| request-level")}
    assert set(rows) == {"engine (CALL_POSITIONS=64)", "engine (CALL_POSITIONS=512)", "request-level"}
    for line in rows.values():
        assert float(line.split("|")[2]) > 0  # tokens/s
    assert engine_module.CALL_POSITIONS == before  # the race leaves the engine's constant as it was


def test_bad_flags_are_refused(exported):
    from loadtests.engine_inprocess import main

    with pytest.raises(SystemExit):
        main(["--artifacts", str(exported), "--call-positions", "a,b"])


def test_serving_benchmark_knows_the_int8_and_one_thread_modes_and_checks_before(tmp_path, exported):
    from loadtests.serving import MODES, parse_args

    assert MODES["engine-int8"]["GLOWING_GENERATOR_PRECISION"] == "int8"
    assert MODES["engine-1t"]["GLOWING_THREADS"] == "1"
    args = parse_args(["--artifacts", str(exported), "--modes", "engine,engine-int8"])
    assert args.mode_list == ["engine", "engine-int8"]
    with pytest.raises(SystemExit):
        parse_args(["--artifacts", str(exported), "--before", str(tmp_path)])  # not a checkout
    from loadtests.server import ROOT

    args = parse_args(["--artifacts", str(exported), "--modes", "engine", "--before", str(ROOT)])
    assert args.mode_list == ["before", "engine"]  # served first, from that checkout
