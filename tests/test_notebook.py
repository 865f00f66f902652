"""notebooks/finetune.ipynb runs top to bottom on a CPU with its tiny config, in this interpreter's kernel."""

import pathlib
import re
import sys

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "finetune.ipynb"


def _text(cell) -> str:
    return "".join(output.get("text", "") for output in cell.get("outputs", []) if output["output_type"] == "stream")


def test_finetune_notebook_executes_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's WORKDIR (tempfile.mkdtemp) and data go here
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        "commit the notebook without outputs"
    # "python3" with argv[0] "python" is started as this interpreter (jupyter_client swaps in sys.executable);
    # the extra cell proves it, so the notebook ran against this checkout's vit_jax and not another install.
    check = "import sys, vit_jax\nprint(sys.executable)\nprint(vit_jax.__file__)"
    notebook.cells.append(nbformat.v4.new_code_cell(check))
    client = NotebookClient(notebook, timeout=900, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails

    executable, package = _text(notebook.cells[-1]).split()
    assert pathlib.Path(executable).resolve() == pathlib.Path(sys.executable).resolve()
    assert pathlib.Path(package).resolve().parent == ROOT / "vit_jax"
    install = next(cell for cell in notebook.cells if "VIT_JAX_SOURCE" in cell.source and cell.cell_type == "code")
    assert not install.outputs  # vit_jax is importable here: nothing was installed

    outputs = "\n".join(_text(cell) for cell in notebook.cells)
    assert "position embeddings at 32 px: (1, 65, 32)" in outputs  # 8x8 patches + class token, resized from 4x4
    before, after = map(float, re.search(r"test accuracy at 32px: ([\d.]+)% before fine-tuning, ([\d.]+)% after",
                                         outputs).groups())
    assert after >= 50.0 and after > before, outputs  # fine-tuning at 32px helps the 16px model
    shots = re.search(r"few-shot of \S+: digits_1shot ([\d.]+)%, digits_5shot ([\d.]+)%, digits_10shot ([\d.]+)%",
                      outputs)
    assert shots and 10.0 < float(shots.group(3)) <= 100.0, outputs  # 10 shots of each digit: above chance
    predicted = re.findall(r"test_\d\.png: true (\d), predicted (\d) \(", outputs)
    assert len(predicted) == 8
    figures = sorted(path.name for path in tmp_path.glob("vit_finetune_*/figures/*.png"))
    assert figures == ["attention_distance.png", "embedding_filters.png", "position_embedding_similarity.png",
                       "rollout_test_0.png", "rollout_test_1.png"]
    assert any(output.get("data", {}).get("image/png") for cell in notebook.cells
               for output in cell.get("outputs", []))
