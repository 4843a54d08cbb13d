"""The benchmarks' output files: an unwritable --out is refused before measuring.

(A re-run into an existing file replaces it atomically through `etcjax.fileio`.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script,flag", [("bench_train.py", "--out"),
                                         ("gpu_check.py", "--out"),
                                         ("bench_etc.py", "--json")])
def test_unwritable_output_is_refused_at_once(tmp_path, script, flag):
  for bad in (tmp_path / "missing" / "out.json", tmp_path):  # No such folder; a folder.
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), flag, str(bad)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: {flag} {bad}: cannot write a file there" in proc.stderr
    assert "Traceback" not in proc.stderr
