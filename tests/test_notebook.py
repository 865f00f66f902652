"""notebooks/finetune.ipynb runs top to bottom on a CPU with its tiny config, in this interpreter's kernel."""

import json
import os
import pathlib
import re
import subprocess
import sys

import nbformat
import pytest
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


def _run_install_cell(cwd: pathlib.Path, **env: str) -> subprocess.CompletedProcess:
    """The notebook's install cell, run as Colab runs it: with the working directory first on sys.path.

    -S leaves out site-packages, so this checkout's vit_jax (installed editable) is not importable: the only
    candidates are what `cwd` holds. Without VIT_JAX_SOURCE the cell raises where it would install.
    """
    cells = nbformat.read(NOTEBOOK, as_version=4).cells
    source = next(cell.source for cell in cells if cell.cell_type == "code" and "VIT_JAX_SOURCE" in cell.source)
    return subprocess.run([sys.executable, "-S", "-c", source], cwd=cwd, env={"PATH": os.environ["PATH"], **env},
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("package", [False, True])
def test_install_cell_does_not_take_a_cloned_checkout_for_the_package(tmp_path, package):
    # `git clone .../vit_jax` in Colab's /content makes /content/vit_jax, the repository's root: no __init__.py,
    # so find_spec("vit_jax") finds a namespace package and `from vit_jax import analysis` fails after all.
    (tmp_path / "vit_jax").mkdir()
    if package:  # the package itself (an __init__.py) is what counts as installed: nothing to do, nothing printed
        (tmp_path / "vit_jax" / "__init__.py").write_text("")
    result = _run_install_cell(tmp_path, VIT_JAX_ACCELERATOR="")
    if package:
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    else:
        assert result.returncode != 0 and "RuntimeError: vit_jax is not installed" in result.stderr, result.stderr


@pytest.mark.parametrize("accelerator, source, requirement", [
    ("", "git+https://example.com/vit_jax", "git+https://example.com/vit_jax"),
    ("cuda", "git+https://example.com/vit_jax", "vit_jax[cuda] @ git+https://example.com/vit_jax"),
    ("tpu", "checkout", "vit_jax[tpu] @ file://{tmp_path}/checkout"),
])
def test_install_cell_installs_the_runtimes_jax_build(tmp_path, accelerator, source, requirement):
    # A stand-in `pip` in the working directory (first on sys.path for `python -m pip`) records its arguments.
    (tmp_path / "checkout").mkdir()
    (tmp_path / "pip").mkdir()
    (tmp_path / "pip" / "__init__.py").write_text("")
    (tmp_path / "pip" / "__main__.py").write_text(
        "import json, sys\nopen('pip_args.json', 'w').write(json.dumps(sys.argv[1:]))\n")
    result = _run_install_cell(tmp_path, VIT_JAX_ACCELERATOR=accelerator, VIT_JAX_SOURCE=source)
    assert result.returncode == 0, result.stderr
    requirement = requirement.format(tmp_path=tmp_path.resolve())
    assert json.loads((tmp_path / "pip_args.json").read_text()) == ["install", "--quiet", requirement]
    assert result.stdout.splitlines()[0] == f"installed {requirement}"
