"""colab/evaluate.ipynb runs headless (nbclient) on a tiny trained workdir and prints metrics."""
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "colab", "evaluate.ipynb")


def _eval_config(data_dir):
  """tiny_config with the rec and caption evaluators on 8 validation images, one batch."""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  c = tiny_config(data_dir, with_evals=True)
  for name in ("gcap", "perplexity"):
    del c.evals[name]
  for name in c.evals:
    c.evals[name].batch_size = 8
    c.evals[name].max_examples = 8
  return c


@pytest.fixture(scope="module")
def workdir(shapes_data_dir, tmp_path_factory):
  """Trained 6 steps without evaluators; WORKDIR/config.json holds the config with them (as
  `ConfigDict.to_json()` writes it)."""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from locca_jax import train  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp("notebook") / "workdir"
  train.train_and_evaluate(tiny_config(shapes_data_dir), str(path))
  (path / "config.json").write_text(_eval_config(shapes_data_dir).to_json())
  return path


def test_notebook_has_a_tagged_parameters_cell_with_workdir_and_config():
  import nbformat  # pylint: disable=g-import-not-at-top
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1
  assert "WORKDIR =" in params[0].source and "CONFIG =" in params[0].source
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # stored clean


@pytest.mark.slow
def test_notebook_runs_headless_and_prints_the_metrics_of_the_workdir(workdir):
  import nbclient  # pylint: disable=g-import-not-at-top
  import nbformat  # pylint: disable=g-import-not-at-top
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # Parameter injection as papermill does it: a cell right after the tagged one.
  at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  nb.cells.insert(at + 1, nbformat.v4.new_code_cell(
      f"WORKDIR = {str(workdir)!r}\nCONFIG = None\nNUM_IMAGES = 2"))
  env_before = os.environ.get("JAX_PLATFORMS")
  os.environ["JAX_PLATFORMS"] = "cpu"  # the kernel inherits the environment
  try:
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": os.path.join(REPO, "colab")}}
                            ).execute()
  finally:
    if env_before is None:
      os.environ.pop("JAX_PLATFORMS")
    else:
      os.environ["JAX_PLATFORMS"] = env_before
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.outputs if o.output_type == "stream" and o.name == "stdout")
  start = text.index("{")
  metrics = json.loads(text[start:text.index("}", start) + 1])
  assert metrics["step"] == 6
  assert 0 <= metrics["rec/acc@0.5"] <= 1 and metrics["rec/num_examples"] > 0
  assert metrics["caption/num_examples"] == 8 and "caption/cider" in metrics
  assert "2 images from" in text
  shown = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
           if o.output_type == "display_data" and "image/png" in o.data]
  assert len(shown) == 1  # the strip of validation images with their boxes
  assert (workdir / "eval" / "rec_step6.jsonl").exists()
