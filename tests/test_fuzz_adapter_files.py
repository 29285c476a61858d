"""A short run of fuzz/fuzz_adapter_files.py: mutated saved adapters are either read
correctly or refused with a ValueError/TypeError naming the file, by every reader
(load_adapter, read_adapter, `bca info`). The long run is `python fuzz/fuzz_adapter_files.py
--iterations 100000`."""

from __future__ import annotations

import importlib.util
import random
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

_PATH = Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_adapter_files.py"


def _harness() -> Any:
    spec = importlib.util.spec_from_file_location("fuzz_adapter_files", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


fuzz = _harness()


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    yield fuzz.make_context(tmp_path_factory.mktemp("fuzz"))


def _fail_report(files: Any, outcomes: list[Any]) -> str:
    bad = fuzz.failures(outcomes)
    return "; ".join(files.labels) + "\n" + "\n".join(f"{o.reader}: {o.detail}" for o in bad)


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_mutations_drawn_by_hypothesis(ctx: Any, data: st.DataObject) -> None:
    files = fuzz.mutate(ctx.base, fuzz.HypothesisChooser(data))
    outcomes = fuzz.run_case(ctx, files)
    assert not fuzz.failures(outcomes), _fail_report(files, outcomes)


def test_seeded_mutations(ctx: Any) -> None:
    counts: Counter[str] = Counter()
    for seed in range(200):
        files = fuzz.mutate(ctx.base, fuzz.RandomChooser(random.Random(seed)))
        outcomes = fuzz.run_case(ctx, files)
        assert not fuzz.failures(outcomes), f"seed {seed}: " + _fail_report(files, outcomes)
        counts.update(o.status for o in outcomes)
    # the mix exercises both paths: damaged files refused, harmless edits read
    assert counts["ok"] > 20 and counts["refused"] > 200, counts


def test_harness_detects_a_reader_that_breaks_the_promise(
    ctx: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bca import _adapter_format

    def broken(*args: object, **kw: object) -> None:
        raise KeyError("modules")

    monkeypatch.setattr(_adapter_format, "check_config", broken)
    outcomes = fuzz.run_case(ctx, ctx.base)
    assert {o.reader for o in fuzz.failures(outcomes)} >= {"load_adapter", "read_adapter"}


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert fuzz.main(["--iterations", "20", "--seed", "3"]) == 0
    assert "20 mutated adapters" in capsys.readouterr().out
