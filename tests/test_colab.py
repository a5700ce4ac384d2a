"""The Colab quickstart runs, in its offline mode, cell by cell: it cannot rot unnoticed."""

import os

import nbformat
from nbclient import NotebookClient

from tests.runs import ROOT


def test_quickstart_notebook_offline(tmp_path):
  nb = nbformat.read(os.path.join(ROOT, "colab", "quickstart.ipynb"), as_version=4)
  params = nb.cells[1]
  assert params.source.startswith("# Parameters") and "OFFLINE = False" in params.source
  params.source = params.source.replace("OFFLINE = False", "OFFLINE = True")
  params.source = params.source.replace('WORKDIR = "/content/jaxkd-run"', f'WORKDIR = "{tmp_path / "run"}"')
  params.source = params.source.replace("STEPS = 200", "STEPS = 8")
  NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
  outputs = "\n".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", []))
  assert "exported student:" in outputs and "->" in outputs
  assert os.path.exists(tmp_path / "run" / "export" / "model.safetensors")
  # What the cells print says what they did: where the export went, and a generated answer.
  lines = outputs.splitlines()
  assert f"exported student: {tmp_path / 'run' / 'export'}" in lines, outputs[-2000:]
  (answer,) = [line.split(" -> ", 1)[1] for line in lines if line.startswith("What is 4 plus 9? -> ")]
  assert answer.strip(), outputs[-2000:]
