"""python -m one_jax.report: real smoke runs (two seeds each of ONE and the baseline, and a run
stopped after its first epoch) as one table of mean ± sd over seeds."""
import csv
import io
import json
import os
import sys

import numpy as np
import pytest

from one_jax import report
from one_jax.training import methods, metric_writers, preemption
from tests.reliability import runs

REPORT = [sys.executable, "-m", "one_jax.report"]


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
  """{name: workdir}: ONE and baseline smoke runs (2 epochs) with seeds 0 and 1, a ONE run of
  seed 2 stopped by SIGTERM in its second epoch, a ONE run of 3 epochs (another config) and a
  CL-ILR run of seed 0."""
  root = tmp_path_factory.mktemp("report")
  made = {}
  for name, variant, extra, fault in [
      ("one-s0", "three_branch", ["--config.seed=0"], None),
      ("one-s1", "three_branch", ["--config.seed=1"], None),
      ("base-s0", "baseline", ["--config.seed=0"], None),
      ("base-s1", "baseline", ["--config.seed=1"], None),
      ("one-s2-stopped", "three_branch", ["--config.seed=2"], "signal_at_step=SIGTERM:6"),
      ("one-3ep", "three_branch", ["--config.seed=0", "--config.num_epochs=3"], None),
      ("cl-s0", "three_branch", ["--config.seed=0", "--config.method=cl_ilr"], None)]:
    workdir = str(root / name)
    result = runs.main([f"--config={runs.STEP1}:{variant},smoke", "--config.progress_bar=False",
                        f"--workdir={workdir}", *extra], fault=fault)
    assert result.returncode == (preemption.EXIT_INTERRUPTED if fault else 0), result.stderr
    made[name] = workdir
  return made


def _final(workdir, key):
  return metric_writers.load_history(workdir)[-1][key] * 100


def test_groups_by_everything_but_the_seed_and_averages_per_head(smoke_runs):
  picked = [report.read_run(smoke_runs[n]) for n in ("one-s0", "base-s0", "one-s1", "base-s1")]
  fields, heads, rows = report.table(picked)
  assert fields[:7] == list(report.LABEL_FIELDS)
  assert heads == ["branch_0", "branch_1", "branch_2", "ensemble", "mean_branch", "model",
                   "deployed"]
  (one_labels, one, one_status), (base_labels, base, _) = rows
  assert one_labels[:2] == ["three_branch", "one_resnet"] and not one_status
  assert base_labels[:2] == ["baseline", "cifar_resnet"]
  want = [_final(smoke_runs[n], "test/top1/ensemble") for n in ("one-s0", "one-s1")]
  assert one["ensemble"].values == tuple(want)
  np.testing.assert_allclose(one["ensemble"].sd, np.std(want, ddof=1))
  assert len(base["model"].values) == 2 and not base["ensemble"].values
  assert one["deployed"] == one["ensemble"] and base["deployed"] == base["model"]
  text = report.render(picked)
  assert f"{np.mean(want):.2f} ± {np.std(want, ddof=1):.2f} (2)" in text
  assert "final epoch's per run; mean ± sample sd" in text


def test_runs_that_differ_in_more_than_the_seed_are_not_merged(smoke_runs):
  picked = [report.read_run(smoke_runs[n]) for n in ("one-s0", "one-s1", "one-3ep")]
  _, _, rows = report.table(picked)
  assert [len(cells["ensemble"].values) for _, cells, _ in rows] == [2, 1]
  assert [labels[6] for labels, _, _ in rows] == ["2", "3"]   # num_epochs tells them apart


def test_runs_of_two_variants_are_two_rows_even_with_equal_fields(smoke_runs, tmp_path):
  """merge_baselines and merge_one_branch differ only in their variant and sources (a path)."""
  renamed = tmp_path / "one-s1-renamed"
  renamed.mkdir()
  for name in ("config.json", "metrics.csv"):
    text = open(os.path.join(smoke_runs["one-s1"], name)).read()
    (renamed / name).write_text(text.replace('"three_branch"', '"other_variant"')
                                if name == "config.json" else text)
  picked = [report.read_run(p) for p in (smoke_runs["one-s0"], str(renamed))]
  _, _, rows = report.table(picked)
  assert [labels[0] for labels, _, _ in rows] == ["three_branch", "other_variant"]


def _copy_run(source, target, edit):
  """A copy of run `source` (its config.json and metrics.csv) at `target`, the config edited."""
  os.makedirs(target)
  with open(os.path.join(source, "config.json")) as f:
    config = json.load(f)
  with open(os.path.join(target, "config.json"), "w") as f:
    json.dump(edit(config), f)
  with open(os.path.join(source, "metrics.csv")) as f, \
      open(os.path.join(target, "metrics.csv"), "w") as g:
    g.write(f.read())
  return report.read_run(target)


def test_other_methods_options_neither_split_nor_label_a_row(smoke_runs, tmp_path):
  """A ONE run recorded before the other methods existed (no field of theirs) and one whose
  PCL option differs are one row; CL-ILR's own option splits its runs, and is '-' for ONE's."""
  theirs = methods.unread_fields("one")
  assert "pcl_temperature" in theirs and "temperature" not in theirs
  older = _copy_run(smoke_runs["one-s1"], str(tmp_path / "older"),
                    lambda c: {k: v for k, v in c.items() if k not in theirs})
  other_pcl = _copy_run(smoke_runs["one-s0"], str(tmp_path / "pcl5"),
                        lambda c: dict(c, pcl_temperature=5.0))
  cl_t5 = _copy_run(smoke_runs["cl-s0"], str(tmp_path / "cl_t5"),
                    lambda c: dict(c, cl_ilr_temperature=5.0, seed=1))
  picked = [other_pcl, older, report.read_run(smoke_runs["cl-s0"]), cl_t5]
  fields, _, rows = report.table(picked)
  assert [len(cells["deployed"].values) for _, cells, _ in rows] == [2, 1, 1]
  assert fields[len(report.LABEL_FIELDS):] == ["cl_ilr_temperature"]
  assert [labels[-1] for labels, _, _ in rows] == ["-", "3.0", "5.0"]


def test_a_field_an_older_record_lacks_is_a_column_that_tells_its_row_apart(smoke_runs,
                                                                             tmp_path):
  """A ONE run recorded before a field every method reads existed is a row of its own (its
  default then may not be today's), and the field is the column that says why."""
  older = _copy_run(smoke_runs["one-s1"], str(tmp_path / "older"),
                    lambda c: {k: v for k, v in c.items() if k != "weight_decay"})
  picked = [report.read_run(smoke_runs["one-s0"]), older, report.read_run(smoke_runs["cl-s0"])]
  fields, _, rows = report.table(picked)
  assert fields[len(report.LABEL_FIELDS):] == ["weight_decay"]
  assert [labels[-1] for labels, _, _ in rows] == ["0.0001", "absent", "0.0001"]
  text = report.render(picked)
  assert "'absent': a field the row's config.json does not have" in text
  assert "'absent'" not in report.render(picked[:1] + picked[2:])   # said only where used


def test_the_deployed_column_is_each_methods_deployed_head(smoke_runs):
  picked = [report.read_run(smoke_runs[n]) for n in ("one-s0", "cl-s0", "base-s0")]
  assert [r.deployed for r in picked] == ["ensemble", "peers_mean", "model"]
  _, heads, rows = report.table(picked)
  assert heads[-1] == "deployed"
  for (_, cells, _), head in zip(rows, ("ensemble", "peers_mean", "model")):
    assert cells["deployed"] == cells[head] and len(cells["deployed"].values) == 1


def test_best_epoch_and_top5(smoke_runs):
  run = report.read_run(smoke_runs["one-3ep"])
  history = metric_writers.load_history(smoke_runs["one-3ep"])
  values = [row["test/top5/branch_1"] * 100 for row in history]
  assert run.value("branch_1", "top5", "best") == pytest.approx(max(values))
  assert run.value("branch_1", "top5", "final") == pytest.approx(values[-1])


def test_an_unfinished_run_is_shown_as_such(smoke_runs):
  picked = [report.read_run(smoke_runs[n]) for n in ("one-s0", "one-s1", "one-s2-stopped")]
  _, _, rows = report.table(picked)
  (_, cells, status), = rows
  assert status == "unfinished: one-s2-stopped 1/2 epochs"
  assert len(cells["ensemble"].values) == 3
  assert report.render(picked).splitlines()[0].endswith("| status |")


def test_command_line_formats_and_plot(smoke_runs, tmp_path):
  dirs = [smoke_runs[n] for n in ("one-s0", "one-s1", "base-s0", "base-s1")]
  markdown = runs.main(dirs, command=REPORT)
  assert markdown.returncode == 0, markdown.stderr
  assert markdown.stdout.startswith("| variant | model | method | depth |")
  as_csv = runs.main(dirs + ["--format=csv", "--epoch=best"],
                     command=REPORT)
  table = list(csv.DictReader(io.StringIO(as_csv.stdout)))
  assert [row["model"] for row in table] == ["one_resnet", "cifar_resnet"]
  assert table[0]["ensemble_n"] == "2" and float(table[0]["ensemble_sd"]) >= 0
  latex = runs.main(dirs + ["--format=latex", f"--plot={tmp_path / 'c.png'}"],
                    command=REPORT)
  assert latex.stdout.startswith(r"\begin{tabular}") and r"$\pm$" in latex.stdout
  with open(tmp_path / "c.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("case,needle", [
    ("missing", "is not a directory"),
    ("empty", "is not a run directory (it has no config.json and metrics)"),
    ("twice", "have the same config and seed (0): give each run once"),
    ("plot_exists", "exists: give a new file for --plot"),
])
def test_bad_input_is_one_line(smoke_runs, tmp_path, case, needle):
  args = {"missing": [str(tmp_path / "nope")],
          "empty": [str(tmp_path)],
          "twice": [smoke_runs["one-s0"], smoke_runs["one-s0"]],
          "plot_exists": [smoke_runs["one-s0"], f"--plot={smoke_runs['one-s0']}/curves.png"]}[case]
  result = runs.main(args, command=REPORT)
  assert result.returncode == 1 and result.stdout == ""
  assert result.stderr.startswith("error: ") and needle in result.stderr, result.stderr
  assert len(result.stderr.strip().splitlines()) == 1
  if case == "plot_exists":
    assert os.path.getsize(f"{smoke_runs['one-s0']}/curves.png") > 0   # not overwritten
  assert json.load(open(os.path.join(smoke_runs["one-s0"], "config.json")))["seed"] == 0
