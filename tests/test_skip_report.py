"""The skip banner (tests/skip_report.py) in a real pytest run of a file with skipped tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_skipped_tests_end_the_run_with_a_banner_of_reasons(tmp_path):
    (tmp_path / "test_some.py").write_text(
        "import pytest\n"
        "def test_ran(): pass\n"
        "@pytest.mark.skip(reason='kubectl is not on PATH')\n"
        "def test_a(): pass\n"
        "@pytest.mark.skip(reason='kubectl is not on PATH')\n"
        "def test_b(): pass\n"
        "def test_c(): pytest.skip('../shared is absent')\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "skip_report", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env={"PYTHONPATH": str(Path(__file__).parent), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 TESTS SKIPPED: NOT CHECKED ON THIS MACHINE" in run.stdout
    assert "   2 skipped: kubectl is not on PATH" in run.stdout
    assert "   1 skipped: ../shared is absent" in run.stdout
