"""Progress reporting when stderr is not a terminal: periodic lines with the time left, start and end lines,
and nothing before an error in the first unit."""

import logging
import time

import pytest

from onnx_dacomp import log


@pytest.fixture(autouse=True)
def propagating(monkeypatch):
    """The CLI tests turn propagation off (the CLI has its own handler); caplog listens at the root."""
    monkeypatch.setattr(log.logger, "propagate", True)


def test_a_long_stage_logs_its_progress_and_time(monkeypatch, caplog):
    monkeypatch.setattr(log, "LOG_INTERVAL", 0.05)
    caplog.set_level(logging.INFO, logger="onnx_dacomp")
    with log.progress(4, "fitting", "layer") as bar:
        for _ in range(4):
            time.sleep(0.06)
            bar.update()
        time.sleep(0.12)  # a slow tail: the timer keeps reporting while no unit finishes
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0] == "fitting (4 layers) ..."
    assert any(line.startswith("fitting: ") and "s elapsed" in line for line in lines[1:-1])
    assert any("s left" in line for line in lines[1:-1])
    assert lines[-1].startswith("fitting: 4 layers in ") and lines[-1].endswith(" s")


def test_an_error_in_the_first_unit_is_the_only_line(caplog):
    caplog.set_level(logging.INFO, logger="onnx_dacomp")
    with pytest.raises(ValueError):
        with log.progress(3, "calibrating", "sample"):
            raise ValueError("bad batch")
    assert caplog.records == []


def test_disabled_progress_is_silent(caplog):
    caplog.set_level(logging.INFO, logger="onnx_dacomp")
    with log.progress(2, "verifying", "sample", enabled=False) as bar:
        bar.update(2)
    assert caplog.records == []


def test_the_time_left_follows_the_work_done_where_units_weigh_differently():
    bar = log.Progress(4, "rank candidates", "layer", work=100.0, enabled=False)
    bar.start -= 60.0  # a minute in
    bar.units_start = bar.start
    bar.update(work=75.0)  # the largest unit, three quarters of the work
    assert bar.status().endswith("about 20 s left")  # not 180 s, as a count of units would say
    plain = log.Progress(4, "calibrating", "batch", enabled=False)
    plain.start -= 60.0
    plain.units_start = plain.start
    plain.update()
    assert plain.status().endswith("about 180 s left")


def test_the_time_left_leaves_out_the_one_off_start_of_the_first_unit(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(log.time, "monotonic", lambda: clock[0])
    bar = log.Progress(10, "layer sensitivity", "layer", enabled=False)
    clock[0] += 10.0  # sessions, reference outputs and workers starting, then the first probe
    bar.update()
    assert bar.status().endswith("about 90 s left")  # one unit seen: its time is all there is to go on
    clock[0] += 1.0
    bar.update(2)  # the next ones come at 2 per second
    assert bar.status() == "3/10 layers, 11 s elapsed, about 4 s left"  # 7 units at 0.5 s, not 7 x 3.7 s
    probes = log.Progress(10, "layer sensitivity", "layer", enabled=False)
    clock[0] += 4.0  # the reference outputs: not a unit's work
    probes.restart()
    probes.parallel = 2  # the rest run on two workers
    clock[0] += 2.0
    probes.update()
    assert probes.status() == "1/10 layers, 6 s elapsed, about 9 s left"  # 9 units x 2 s / 2 workers


def test_units_found_done_count_but_do_not_set_the_rate(monkeypatch):
    """Fits reused from the ratio search's earlier probes (or the cache) are done at once: a stage that
    starts with 7 of 33 such units and then works 10 s on the next has 25 units of 10 s ahead, not 7 units'
    worth of nothing in 10 s (an estimate that grew by 960 s every 10 s without them)."""
    clock = [0.0]
    monkeypatch.setattr(log.time, "monotonic", lambda: clock[0])
    bar = log.Progress(33, "decomposing", "layer", work=33.0, enabled=False)
    bar.update(7, work=7.0, reused=True)
    clock[0] += 10.0
    assert bar.status() == "7/33 layers, 10 s elapsed"  # nothing worked on yet: no estimate
    bar.update(work=1.0)
    assert bar.status() == "8/33 layers, 10 s elapsed, about 250 s left"
    clock[0] += 20.0
    bar.update(2, work=2.0)
    assert bar.status() == "10/33 layers, 30 s elapsed, about 230 s left"  # 23 units at 10 s (since the first)
