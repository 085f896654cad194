"""examples/cooperative_networks.ipynb, executed top to bottom at smoke scale
(ONE_JAX_NOTEBOOK_SMOKE=1): every experiment of the plan runs, its checks hold, and the report's
tables and figures are shown."""
import os

import nbformat
from nbclient import NotebookClient
import pytest

NOTEBOOK = os.path.join("examples", "cooperative_networks.ipynb")


@pytest.fixture(scope="module")
def executed(repo_root, tmp_path_factory):
  runs = tmp_path_factory.mktemp("notebook_runs")
  nb = nbformat.read(os.path.join(repo_root, NOTEBOOK), as_version=4)
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
      "the notebook is committed without outputs")
  env = {"ONE_JAX_NOTEBOOK_SMOKE": "1", "ONE_JAX_NOTEBOOK_RUNS": str(runs),
         "ONE_JAX_REPO": repo_root,
         # The runs share the suite's compilation cache (conftest), as a user's runs share theirs.
         "JAX_COMPILATION_CACHE_DIR": os.environ.get("ONE_JAX_TEST_CACHE",
                                                     "/tmp/one_jax_test_xla_cache")}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)   # the kernel, and the commands it starts, inherit the environment
  try:
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": os.path.join(repo_root, "examples")}}).execute()
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return nb, runs


def _outputs(nb, kind):
  return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
          if kind in o.get("data", {})]


def test_every_experiment_of_the_plan_ran(executed):
  _, runs = executed
  for name in ("baseline-s2", "three_branch-s1", "five_branch-s0", "baseline_after_lr-s0",
               "five_branch_top5-s0", "three_into_five-s0",
               "merge_baselines-s0", "merge_one_branch-s0", "one_into_three-s0",
               "one_inside_three-s0"):
    assert os.path.isfile(runs / name / "summary.txt"), name
  assert os.path.isfile(runs / "vote-five_branch-s0" / "voting.csv")   # evaluation only
  assert os.path.isdir(runs / "three_into_five-s0-branch3")   # the extracted student


def test_the_report_tables_and_the_figures_are_shown(executed):
  nb, _ = executed
  tables = [o["data"]["text/markdown"] for o in _outputs(nb, "text/markdown")]
  step1 = next(t for t in tables if "five_branch_top5" in t)
  assert "| three_branch | one_resnet | one |" in step1 and " ± " in step1 and "(3) |" in step1
  step2 = next(t for t in tables if "merge_one_branch" in t)
  assert "| merge_baselines |" in step2 and "| one_inside_three |" in step2
  assert any("Test top-5 accuracy" in t and "best epoch" in t for t in tables)
  assert len(_outputs(nb, "image/png")) >= 2    # the report's curves and a run's curves.png
  printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.outputs)
  assert "largest difference of the ensembles' logits, 3 vs 5 branches" in printed
  assert r"\begin{tabular}" in printed
