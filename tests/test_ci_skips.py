"""Under CI=true a skip fails the run unless its reason says the test needs CUDA.

Each case runs pytest in a subprocess on a scratch directory whose conftest.py is this
suite's conftest.py, so the hook under test is the one CI uses.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

CONFTEST = Path(__file__).with_name("conftest.py")

ALLOWED = """
    import pytest

    @pytest.mark.skipif(True, reason="needs CUDA")
    def test_cuda_only():
        pass

    def test_expected_failure():
        pytest.xfail("a known upstream bug")

    def test_runs():
        assert True
"""

CASES = {
    "skip in the test body": """
        import pytest

        def test_body_skip():
            pytest.skip("bca._bca extension not built")
    """,
    "skipif marker": """
        import pytest

        @pytest.mark.skipif(True, reason="no extension")
        def test_marker_skip():
            pass
    """,
    "module-level importorskip": """
        import pytest

        pytest.importorskip("bca_no_such_module")

        def test_never_collected():
            pass
    """,
}


def _run_pytest(tmp_path: Path, files: dict[str, str], ci: str | None) -> str:
    """Run pytest on ``files`` (name -> source) next to this suite's conftest.py; return
    its output, which ends with the exit status as ``exit status: N``."""
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    for name, body in files.items():
        (tmp_path / name).write_text(textwrap.dedent(body))
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    if ci is not None:
        env["CI"] = ci
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return f"{run.stdout}{run.stderr}\nexit status: {run.returncode}"


SKIPPING = {f"test_case_{i}.py": body for i, body in enumerate(CASES.values())}


def test_unexpected_skips_fail_under_ci(tmp_path: Path) -> None:
    out = _run_pytest(tmp_path, {"test_allowed.py": ALLOWED, **SKIPPING}, ci="true")
    assert out.endswith("exit status: 1"), out
    listed = out.split("unexpected skips under CI=true")[-1].split("short test summary")[0]
    for name in SKIPPING:  # every kind of skip is listed
        assert name in listed, out
    assert "2 passed" not in out and "1 passed" in out and "1 xfailed" in out  # the rest ran
    assert "needs CUDA" in out and "test_allowed.py" not in listed  # a CUDA skip is fine


def test_skips_are_fine_outside_ci(tmp_path: Path) -> None:
    out = _run_pytest(tmp_path, {"test_allowed.py": ALLOWED, **SKIPPING}, ci=None)
    assert out.endswith("exit status: 0"), out
    assert "unexpected skip" not in out


def test_cuda_skip_and_xfail_pass_under_ci(tmp_path: Path) -> None:
    out = _run_pytest(tmp_path, {"test_allowed.py": ALLOWED}, ci="true")
    assert out.endswith("exit status: 0"), out
    assert "1 passed" in out and "1 skipped" in out and "1 xfailed" in out
