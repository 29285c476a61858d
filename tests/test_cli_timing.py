"""bca._timing and the timings of `bca bench`: CPU time by default, samples batched and
repeated, and a warning naming the load average and cores on a busy machine."""

from __future__ import annotations

import time

import pytest

from bca import _timing
from bca._timing import Load, load_warning, machine_load, measure


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_cpu_clock_leaves_out_waiting() -> None:
    # sleeping is waiting, not work: wall time sees it, CPU time does not
    cpu = measure(lambda: time.sleep(0.002), clock="cpu", min_samples=3, budget_s=0.5)
    wall = measure(lambda: time.sleep(0.002), clock="wall", min_samples=3, budget_s=0.5)
    assert wall.median >= 1.9
    assert cpu.median < 0.5 * wall.median
    assert (cpu.clock, wall.clock) == ("cpu", "wall")


def test_work_is_measured_and_samples_are_batched() -> None:
    t = measure(lambda: _spin(0.001), min_samples=5, budget_s=1.0)
    assert 0.9 <= t.median <= 3.0, t
    assert t.best <= t.median and t.samples >= 5
    tiny = measure(lambda: None, min_samples=3, budget_s=0.2, min_sample_s=0.002)
    # a call far below the clock's resolution is timed in batches of many calls
    assert tiny.number > 100 and tiny.median < 0.01


def test_measure_argument_errors() -> None:
    with pytest.raises(ValueError, match="clock"):
        measure(lambda: None, clock="sundial")
    with pytest.raises(ValueError, match="min_samples"):
        measure(lambda: None, min_samples=0)


def test_load_warning_names_load_and_cores() -> None:
    assert load_warning(Load(0.3, 2)) is None
    assert load_warning(Load(float("nan"), 2)) is None
    w = load_warning(Load(6.1, 2), "cpu", threads=1)
    assert w is not None and w.startswith("warning: the machine is busy")
    assert "load average 6.1 on 2 cores" in w and "CPU time" in w
    w2 = load_warning(Load(6.1, 2), "cpu", threads=2)
    assert w2 is not None and "2-thread" in w2 and "1 thread" in w2
    w3 = load_warning(Load(3.0, 1), "wall")
    assert w3 is not None and "on 1 core)" in w3 and "wall-clock" in w3


def test_machine_load_is_read() -> None:
    load = machine_load()
    assert load.cores >= 1
    assert load.load1 != load.load1 or load.load1 >= 0


def _fake_load(monkeypatch: pytest.MonkeyPatch, load1: float) -> None:
    import bca.demo.bench as demo_bench

    def fake() -> Load:
        return Load(load1, 2)

    monkeypatch.setattr(_timing, "machine_load", fake)
    monkeypatch.setattr(demo_bench, "machine_load", fake)


def test_bench_warns_on_a_busy_machine(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("torch")
    from bca.cli import main

    _fake_load(monkeypatch, 9.5)
    argv = ["bench", "--sizes", "32", "--block-size", "16", "--rows", "1", "--repeats", "2"]
    assert main([*argv, "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "CPU ms" in out and "process CPU time" in out
    assert "warning: the machine is busy (load average 9.5 on 2 cores)" in out
    _fake_load(monkeypatch, 0.1)
    assert main([*argv, "--threads", "1", "--clock", "wall"]) == 0
    out = capsys.readouterr().out
    assert "warning" not in out and "wall-clock time" in out and "CPU ms" not in out


def test_demo_timing_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    from bca.demo.bench import measure_ms, timing_note

    assert 0.9 <= measure_ms(lambda: _spin(0.001), budget_s=0.5) <= 3.0
    _fake_load(monkeypatch, 4.0)
    note = timing_note("cpu", threads=2)
    assert "load average 4.0 on 2 cores" in note and "warning" in note
    assert "warning" not in timing_note("cpu", [Load(0.5, 2)])


def test_closed_pipe_is_not_an_error_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bca bench ... | head`: the reader leaving is not reported as a BrokenPipeError."""
    import sys

    from bca.cli import main

    class Gone:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stdout", Gone())
    assert main(["bench", "--list"]) == 1
    assert "BrokenPipe" not in capsys.readouterr().err
