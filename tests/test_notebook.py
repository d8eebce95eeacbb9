"""experiments/colab_tpu.ipynb runs top to bottom, here on CPU with a small setting.

The notebook is executed as Colab would run it, in a Jupyter kernel (nbclient), with its
parameters cell overridden the way papermill does it: a cell after it that sets the new
values. The kernel is this interpreter, with this checkout first on its path, and it
inherits the 8 fake CPU devices of conftest.py, so training runs under pmap over 8 devices
as on a v2-8 TPU. The embedded digits dataset keeps the training run to about 30 s.
"""

import copy
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import nbclient
import nbformat
import pytest

pytestmark = [pytest.mark.notebook, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "experiments" / "colab_tpu.ipynb"
KERNEL_NAME = "attnjax-test-python"
CELL_TIMEOUT_S = 300


def load_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def tagged(nb, tag: str):
    cells = [cell for cell in nb.cells if tag in cell.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def with_parameters(nb, **values):
    """A copy of ``nb`` with a cell after the parameters cell that sets ``values`` (papermill's way)."""
    nb = copy.deepcopy(nb)
    defined = set(re.findall(r"^([A-Z_]+) =", tagged(nb, "parameters").source, flags=re.M))
    unknown = set(values) - defined
    assert not unknown, f"the parameters cell does not define {sorted(unknown)}"
    cell = nbformat.v4.new_code_cell("\n".join(f"{name} = {value!r}" for name, value in values.items()))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(nb.cells.index(tagged(nb, "parameters")) + 1, cell)
    return nb


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    """A kernelspec that starts this interpreter, with this checkout (not an installed attnjax) first on its path."""
    jupyter = tmp_path / "jupyter"
    spec = jupyter / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "attnjax test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))  # connection files
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))  # no history in the home folder
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), *(os.path.abspath(p) for p in paths)]))
    return KERNEL_NAME


def outputs(cell, output_type: str):
    return [o for o in cell.outputs if o.output_type == output_type]


def stdout(cell) -> str:
    return "".join(o.text for o in outputs(cell, "stream") if o.name == "stdout")


def test_committed_notebook_is_clean():
    nb = load_notebook()
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), (
        "clear the outputs before committing"
    )
    parameters = tagged(nb, "parameters").source
    assert 'DATASET = "cifar10"' in parameters and "INSTALL = True" in parameters
    assert "setup_tpu" not in "".join(cell.source for cell in code)  # today's TPU runtimes need no set-up


def test_notebook_trains_plots_and_draws_attention(kernel, tmp_path, devices):
    workdir = tmp_path / "run"
    nb = with_parameters(
        load_notebook(),
        INSTALL=False,
        DATASET="digits",
        BLOCK="cbam",
        EPOCHS=1,
        BATCH_SIZE=64,
        WORKDIR=str(workdir),
        NUM_MAP_IMAGES=3,
    )
    client = nbclient.NotebookClient(
        nb, kernel_name=kernel, timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the traceback, if a cell fails

    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not outputs(cell, "error"), cell.source

    devices_out = stdout(tagged(nb, "devices"))
    assert f"from {ROOT / 'attnjax'}" in devices_out  # this checkout, not an installed copy
    assert f"{len(devices)} local device(s)" in devices_out

    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1
    accuracy = float(re.search(r"final test accuracy: ([0-9.]+)", stdout(tagged(nb, "train"))).group(1))
    assert accuracy == pytest.approx(records[-1]["test_accuracy"], abs=1e-4)
    assert accuracy > 0.8  # one epoch on digits ends near 0.95

    for tag, png in (("learning-curves", "learning_curves.png"), ("attention-maps", "attention.png")):
        images = [o for o in outputs(tagged(nb, tag), "display_data") if "image/png" in o.data]
        assert len(images) == 1, f"the {tag} cell shows no image"
        assert (workdir / png).is_file()
    assert "block/channel, block/spatial" in stdout(tagged(nb, "attention-maps"))


def test_notebook_finds_a_prepared_tfds_dataset(kernel, tmp_path, tfds_data_dir):
    """The data cell's TFDS branch, up to the data cell: a prepared dataset needs no TensorFlow install."""
    nb = with_parameters(
        load_notebook(), INSTALL=False, DATASET="fashion_mnist", BATCH_SIZE=64, DATA_DIR=str(tfds_data_dir)
    )
    nb.cells = nb.cells[: nb.cells.index(tagged(nb, "data")) + 1]
    nbclient.NotebookClient(
        nb, kernel_name=kernel, timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    assert "fashion_mnist prepared in" in stdout(nb.cells[-1])
    assert "train 60,000, test 10,000" in stdout(nb.cells[-1])


def test_interrupting_the_training_cell_and_running_it_again_continues_the_run(kernel, tmp_path, devices):
    """The Colab recipe: the interrupt button (SIGINT to the kernel) saves; the same cell again continues."""
    workdir = tmp_path / "run"
    nb = with_parameters(load_notebook(), INSTALL=False, DATASET="digits", EPOCHS=1, BATCH_SIZE=8, WORKDIR=str(workdir))
    train_index = nb.cells.index(tagged(nb, "train"))
    client = nbclient.NotebookClient(
        nb, kernel_name=kernel, timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(tmp_path)}}
    )

    def interrupt_at_step(pid, step):
        progress = workdir / "progress"
        deadline = time.monotonic() + CELL_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if int(progress.read_text().strip() or 0) >= step:
                    os.kill(pid, signal.SIGINT)  # what Jupyter's interrupt does to a local kernel
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.05)

    cell = nb.cells[train_index]
    with client.setup_kernel():
        for index in range(train_index):
            client.execute_cell(nb.cells[index], index)
        interrupter = threading.Thread(target=interrupt_at_step, args=(client.km.provisioner.pid, 20))
        interrupter.start()
        with pytest.raises(nbclient.exceptions.CellExecutionError, match="Rerun the same command to continue"):
            client.execute_cell(cell, train_index)
        interrupter.join()
        assert outputs(cell, "error")[0].ename == "SystemExit"
        saved = sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())
        assert saved and 20 <= saved[-1] < 179
        cell.outputs = []
        client.execute_cell(cell, train_index)  # run the same cell again
    out = stdout(cell)
    assert f"resumed from {workdir}/checkpoints/{saved[-1]} (step {saved[-1]}, epoch 1" in out
    assert "final test accuracy" in out and not outputs(cell, "error")
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 1
