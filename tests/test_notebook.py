"""Executes notebooks/simflow_demo.ipynb top to bottom, so the Colab demo cannot rot.

The notebook runs in a fresh kernel on this interpreter (a kernelspec written to a temporary
JUPYTER_PATH points at sys.executable) with SIMFLOW_NB_STEPS=4 and SIMFLOW_NB_TINY=1 (the
notebook's documented smoke-test switches) and SIMFLOW_NB_WORKDIR set, so its outputs can be
checked: the sample grid (one row per class), the printed held-out bits/dim, the guidance and
interpolation figures, and an inline image for every figure cell. A second test checks that
the committed notebook carries no outputs.
"""
import json
import math
import os
import re
import sys

import nbclient
import nbformat
import numpy as np
import pytest
from PIL import Image

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks",
                        "simflow_demo.ipynb")
KERNEL_NAME = "simflow_nb_test"
TIMEOUT_S = 600  # per cell


def _install_kernelspec(jupyter_dir) -> None:
  """A kernelspec running ipykernel on this very interpreter (the venv's python)."""
  spec_dir = jupyter_dir / "kernels" / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
          "display_name": "simflow-jax test kernel", "language": "python"}
  (spec_dir / "kernel.json").write_text(json.dumps(spec))


def _outputs(cell, output_type):
  return [o for o in cell.get("outputs", []) if o["output_type"] == output_type]


def _stdout(nb) -> str:
  return "".join(o["text"] for c in nb.cells if c.cell_type == "code"
                 for o in _outputs(c, "stream") if o["name"] == "stdout")


def test_committed_notebook_has_no_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code, "the notebook has no code cells"
  dirty = [i for i, c in enumerate(code) if c.outputs or c.execution_count is not None]
  assert not dirty, (f"code cells {dirty} of {NOTEBOOK} carry outputs: clear them before "
                     "committing (Jupyter: Edit > Clear Outputs of All Cells, then save)")


@pytest.mark.slow  # a Jupyter kernel that imports jax and trains the demo briefly
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  jupyter_dir = tmp_path / "jupyter"
  _install_kernelspec(jupyter_dir)
  workdir = tmp_path / "work"
  monkeypatch.setenv("JUPYTER_PATH", str(jupyter_dir))
  monkeypatch.setenv("SIMFLOW_NB_STEPS", "4")
  monkeypatch.setenv("SIMFLOW_NB_TINY", "1")
  monkeypatch.setenv("SIMFLOW_NB_WORKDIR", str(workdir))

  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name=KERNEL_NAME,
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError on the first failing cell

  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count is not None for c in code), "a code cell did not run"
  assert not any(_outputs(c, "error") for c in code)
  stdout = _stdout(nb)

  # The kernel saw the test's settings.
  assert "4 steps, batch 8" in stdout, stdout
  assert f"workdir {workdir}" in stdout

  # Training wrote its metrics and a grid with one row per class (configs/tiny.py: 2 per class).
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert rows[-1]["step"] == 4 and math.isfinite(rows[-1]["loss"])
  grids = sorted((workdir / "samples").glob("grid_*.png"))
  assert [g.name for g in grids] == ["grid_00000004.png"]
  tile = 32 + 2  # image size + save_image_grid's padding
  assert np.asarray(Image.open(grids[0])).shape == (10 * tile + 2, 2 * tile + 2)

  # Held-out bits/dim was printed and is a finite number.
  match = re.search(r"bits/dim of x = mu \+ sigma_bar\*eps \(ELBO term\): (-?\d+\.\d+)", stdout)
  assert match, stdout
  assert math.isfinite(float(match.group(1)))
  assert "Held-out digits: 500 (256 latent dims each)" in stdout

  # Guidance comparison (10 classes x 4 seeds each) and the 12-frame interpolation strip.
  for w in ("0", "1", "3"):
    guided = np.asarray(Image.open(workdir / f"guidance_{w}.png"))
    assert guided.shape == (10 * tile + 2, 4 * tile + 2)
  assert np.asarray(Image.open(workdir / "interpolation.png")).shape == (tile + 2, 12 * tile + 2)

  # Loss curves, sample grid, guidance and interpolation are shown inline.
  shown = [c for c in code for o in _outputs(c, "display_data") if "image/png" in o["data"]]
  assert len(shown) >= 4, f"{len(shown)} inline figures"
