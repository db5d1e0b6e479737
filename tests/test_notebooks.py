"""The notebooks: committed without outputs, and each runs top to bottom.

Each notebook's heavy settings live in one cell tagged "parameters"; the tests
replace that cell's source with small settings (a tiny model, a few steps)
and execute the notebook in a fresh kernel with nbclient. Any cell error
fails the test with the cell's traceback.
"""

import ast
import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = pathlib.Path(__file__).parent.parent
NOTEBOOKS = REPO / "notebooks"
KERNEL = "research-bert-tests"
TIMEOUT_S = 300  # per cell


def _notebooks():
  return sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))


def _parameter_cell(nb):
  cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(cells) == 1, "exactly one cell must be tagged 'parameters'"
  assert cells[0].cell_type == "code"
  return cells[0]


def _assigned_names(source):
  names = set()
  for node in ast.parse(source).body:
    if isinstance(node, ast.Assign):
      for target in node.targets:
        elts = target.elts if isinstance(target, ast.Tuple) else [target]
        names.update(e.id for e in elts)
  return names


def test_expected_notebooks_exist():
  assert _notebooks() == ["compare_runs.ipynb", "interpret.ipynb",
                          "quickstart.ipynb"]


@pytest.mark.parametrize("name", _notebooks())
def test_committed_notebook_has_no_outputs_and_one_parameter_cell(name):
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [], f"{name} cell {i} has outputs: strip them"
      assert cell.execution_count is None, f"{name} cell {i} has a count"
  assert _assigned_names(_parameter_cell(nb).source)


@pytest.fixture(scope="session")
def kernel_name(tmp_path_factory):
  """A kernelspec for this very interpreter, in a temporary JUPYTER_PATH.

  A fresh machine may have no "python3" kernelspec, or one for another
  Python; this one runs `sys.executable`, where `research` is installed.
  """
  from ipykernel import kernelspec  # pylint: disable=import-outside-toplevel
  prefix = tmp_path_factory.mktemp("jupyter")
  kernelspec.install(kernel_name=KERNEL, prefix=str(prefix))
  share = prefix / "share" / "jupyter"
  assert (share / "kernels" / KERNEL / "kernel.json").is_file()
  old = os.environ.get("JUPYTER_PATH")
  os.environ["JUPYTER_PATH"] = os.pathsep.join(
      [str(share)] + ([old] if old else []))
  yield KERNEL
  if old is None:
    os.environ.pop("JUPYTER_PATH", None)
  else:
    os.environ["JUPYTER_PATH"] = old


def _kernel_env():
  env = dict(os.environ)
  # One CPU device: the 8 simulated devices of conftest.py are for mesh tests.
  env.pop("XLA_FLAGS", None)
  # The kernel's inline backend renders plots as image/png outputs; a
  # MPLBACKEND inherited from the shell (e.g. agg) would swallow them.
  env.pop("MPLBACKEND", None)
  env.update(WANDB_MODE="disabled", WANDB_SILENT="true")
  # This checkout's `research`, even where it is not pip-installed.
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  return env


def _execute(name, overrides, kernel_name, cwd):
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  cell = _parameter_cell(nb)
  # The cell is replaced whole, so the overrides must set every parameter.
  names = _assigned_names(cell.source)
  assert set(overrides) == names, (
      f"{name}: unknown parameters {sorted(set(overrides) - names)}, "
      f"missing {sorted(names - set(overrides))}")
  cell.source = "\n".join(f"{k} = {v!r}" for k, v in overrides.items())
  client = nbclient.NotebookClient(
      nb, timeout=TIMEOUT_S, kernel_name=kernel_name,
      resources={"metadata": {"path": str(cwd)}})
  client.execute(env=_kernel_env())
  return nb


def _outputs(nb, kind):
  """All outputs' data of a MIME type (e.g. "image/png"), or stream texts."""
  found = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if kind == "stream" and out.output_type == "stream":
        found.append(out.text)
      elif kind in out.get("data", {}):
        found.append(out.data[kind])
  return found


@pytest.mark.slow
def test_quickstart_notebook(tmp_path, tiny_model_dir, kernel_name):
  nb = _execute("quickstart.ipynb", {
      "model_name": str(tiny_model_dir), "total_steps": 6,
      "eval_every_steps": 3, "learning_rate": 1e-3,
      "workdir": str(tmp_path / "run")}, kernel_name, tmp_path)
  assert len(_outputs(nb, "image/png")) == 1  # the curves
  text = "".join(_outputs(nb, "stream"))
  assert text.count("The battery lasts all day") == 1
  assert "positive" in text or "negative" in text
  assert (tmp_path / "run" / "hf" / "model.safetensors").is_file()


def test_interpret_notebook(tmp_path, kernel_name):
  # The real MiniLM with an untrained head: no training, attention is real.
  nb = _execute("interpret.ipynb", {
      "model_name": "all-minilm-l6-v2", "run_workdir": "", "train_steps": 0,
      "ig_steps": 16, "baseline": "pad", "layer": 5, "head": 11},
      kernel_name, tmp_path)
  pages = "".join(_outputs(nb, "text/html"))
  assert pages.count("relative error") == 3 + 4
  assert "<span" in pages and ">friendly</span>" in pages
  assert len(_outputs(nb, "image/png")) == 4  # bars, head, layer grid, [CLS]
  assert "attention maps: (6, 12, " in "".join(_outputs(nb, "stream"))


@pytest.mark.slow
def test_compare_runs_notebook(tmp_path, tiny_model_dir, kernel_name):
  nb = _execute("compare_runs.ipynb", {
      "model_name": str(tiny_model_dir), "learning_rates": [1e-3, 1e-5],
      "total_steps": 4, "eval_every_steps": 2,
      "output_dir": str(tmp_path / "runs"), "workdirs": [],
      "wandb_project": ""}, kernel_name, tmp_path)
  tables = [t for t in _outputs(nb, "text/html") if "<table>" in t]
  assert len(tables) == 1
  assert "lr_0.001" in tables[0] and "lr_1e-05" in tables[0]
  assert len(_outputs(nb, "image/png")) == 1
  assert sorted(os.listdir(tmp_path / "runs")) == ["lr_0.001", "lr_1e-05"]
  assert "W&B: skipped" in "".join(_outputs(nb, "stream"))


def test_overrides_must_match_the_parameter_cell(tmp_path):
  with pytest.raises(AssertionError, match=r"unknown parameters \['totl_steps'\], "
                     r"missing \['eval_every_steps', .*'total_steps'"):
    _execute("quickstart.ipynb", {"totl_steps": 1}, None, tmp_path)
