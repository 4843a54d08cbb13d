"""Runs every cell of the Colab notebook, top to bottom, on the CPU with tiny sizes.

The notebook reads ETCJAX_NOTEBOOK_TINY=1 to shrink its training to a few steps and
ETCJAX_NOTEBOOK_WORKDIR for its outputs; everything else is exactly what a Colab user runs
(the install cell skips itself because etcjax is importable).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from etcjax.keys import EtcKey

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "etcjax_colab_tpu.ipynb"


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  monkeypatch.setenv("ETCJAX_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("ETCJAX_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()

  outputs = {i: cell.get("outputs", []) for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code"}
  text = "\n".join(o.get("text", "") for outs in outputs.values() for o in outs
                   if o.output_type == "stream")
  assert "cpu device(s)" in text
  assert "test accuracy" in text and "on EtC images (key fingerprint" in text
  assert "of these 8 right" in text
  # Three figures: the photos, the curves, the digits.
  images = [o for outs in outputs.values() for o in outs if "image/png" in o.get("data", {})]
  assert len(images) == 3
  assert (tmp_path / "work" / "metrics.json").exists()
  # The key file exists with mode 0600 and its bytes never reach the outputs.
  key_file = tmp_path / "work" / "colab.key"
  assert key_file.stat().st_mode & 0o777 == 0o600
  assert EtcKey.load(key_file).to_bytes().hex() not in text


def test_notebook_is_stored_without_outputs():
  """Outputs would go stale (and could hold a key fingerprint of someone's run)."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None
