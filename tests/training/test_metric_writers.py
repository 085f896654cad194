"""Tests for one_jax.training.metric_writers: what a run leaves in its workdir."""
import csv
import glob
import json
import os
import struct
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from one_jax.training import metric_writers
from one_jax.training.metric_writers import MetricWriter, progress_bar, summary_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _read_csv(workdir):
  with open(os.path.join(workdir, "metrics.csv"), newline="") as f:
    rows = list(csv.reader(f))
  return rows[0], rows[1:]


def _read_jsonl(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _tb_events(workdir):
  """(file, [Event]) per event file, parsed from the TFRecord framing."""
  from tensorboardX.proto import event_pb2
  out = []
  for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "*tfevents*"))):
    events = []
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[pos + 12:pos + 12 + length])
      events.append(event)
      pos += 12 + length + 4
    out.append((path, events))
  return out


def _scalars(events):
  return [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value]


def _log_three_epochs(workdir, **kwargs):
  writer = MetricWriter(workdir, **kwargs)
  writer.write_epoch(1, {"train/loss": 2.5, "lr": 0.1})
  # New column in epoch 2; numpy, jax and int values are accepted.
  writer.write_epoch(2, {"train/loss": np.float32(2.0), "lr": 0.1,
                         "test/top1/ensemble": jnp.asarray(0.5), "train_images": np.int64(100)})
  writer.write_epoch(3, {"train/loss": 1.5, "lr": 0.01, "test/top1/ensemble": 0.625,
                         "train_images": 100})
  return writer


def test_csv_and_jsonl_after_three_epochs_with_new_column(tmp_path):
  workdir = str(tmp_path)
  _log_three_epochs(workdir).close()

  header, rows = _read_csv(workdir)
  assert header == ["epoch", "train/loss", "lr", "test/top1/ensemble", "train_images"]
  assert rows == [["1", "2.5", "0.1", "", ""],
                  ["2", "2.0", "0.1", "0.5", "100"],
                  ["3", "1.5", "0.01", "0.625", "100"]]
  lines = _read_jsonl(workdir)
  assert lines == [
      {"epoch": 1, "train/loss": 2.5, "lr": 0.1},
      {"epoch": 2, "train/loss": 2.0, "lr": 0.1, "test/top1/ensemble": 0.5, "train_images": 100},
      {"epoch": 3, "train/loss": 1.5, "lr": 0.01, "test/top1/ensemble": 0.625,
       "train_images": 100},
  ]
  assert isinstance(lines[1]["train_images"], int)
  # No temp files left behind by the atomic CSV writes.
  assert sorted(os.listdir(workdir)) == ["metrics.csv", "metrics.jsonl", "tensorboard"]


def test_bad_metric_values_are_rejected(tmp_path):
  writer = MetricWriter(str(tmp_path))
  with pytest.raises(TypeError, match="train/loss"):
    writer.write_epoch(1, {"train/loss": np.zeros(3)})
  with pytest.raises(TypeError, match="name"):
    writer.write_epoch(1, {"name": "abc"})
  with pytest.raises(ValueError, match="epoch"):
    writer.write_epoch(0, {"train/loss": 1.0})
  writer.close()


def test_resume_truncates_to_resume_epoch(tmp_path):
  workdir = str(tmp_path)
  _log_three_epochs(workdir).close()

  writer = MetricWriter(workdir, resume_epoch=2)
  header, rows = _read_csv(workdir)
  assert [r[0] for r in rows] == ["1", "2"]
  assert header == ["epoch", "train/loss", "lr", "test/top1/ensemble", "train_images"]
  assert [line["epoch"] for line in _read_jsonl(workdir)] == [1, 2]
  assert [r["epoch"] for r in writer.rows] == [1, 2]

  writer.write_epoch(3, {"train/loss": 1.25, "lr": 0.01, "test/top1/ensemble": 0.75,
                         "train_images": 100})
  writer.close()
  _, rows = _read_csv(workdir)
  assert [r[0] for r in rows] == ["1", "2", "3"]
  assert rows[2][1] == "1.25"
  lines = _read_jsonl(workdir)
  assert [line["epoch"] for line in lines] == [1, 2, 3]
  assert lines[2]["train/loss"] == 1.25

  # TensorBoard: the resumed writer's file starts with a purge at step 3, then logs epoch 3 once.
  files = _tb_events(workdir)
  assert len(files) == 2
  resumed = max(files, key=lambda f: os.path.getmtime(f[0]))[1]
  starts = [e.step for e in resumed if e.HasField("session_log")]
  assert starts == [3]
  assert [(s, t) for s, t, _ in _scalars(resumed) if t == "train/loss"] == [(3, "train/loss")]


def test_resume_drops_columns_only_seen_in_dropped_epochs(tmp_path):
  workdir = str(tmp_path)
  writer = MetricWriter(workdir)
  writer.write_epoch(1, {"a": 1.0})
  writer.write_epoch(2, {"a": 2.0, "b": 3.0})
  writer.close()
  MetricWriter(workdir, resume_epoch=1).close()
  header, rows = _read_csv(workdir)
  assert header == ["epoch", "a"] and rows == [["1", "1.0"]]


def test_resume_survives_torn_jsonl_line(tmp_path):
  workdir = str(tmp_path)
  _log_three_epochs(workdir).close()
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"epoch": 4, "train/lo')  # a crash in the middle of an append
  writer = MetricWriter(workdir, resume_epoch=3)
  writer.write_epoch(4, {"train/loss": 1.0})
  writer.close()
  assert [line["epoch"] for line in _read_jsonl(workdir)] == [1, 2, 3, 4]


def test_tensorboard_scalars_per_metric_with_epoch_steps(tmp_path):
  workdir = str(tmp_path)
  _log_three_epochs(workdir).close()
  files = _tb_events(workdir)
  assert len(files) == 1 and os.path.getsize(files[0][0]) > 0
  scalars = _scalars(files[0][1])
  assert [(s, v) for s, t, v in scalars if t == "train/loss"] == [(1, 2.5), (2, 2.0), (3, 1.5)]
  assert [s for s, t, _ in scalars if t == "test/top1/ensemble"] == [2, 3]


def test_tensorboard_writer_leaves_pytorch_unloaded_and_importable(tmp_path):
  """tensorboardX imports PyTorch when it is installed (a second of every run's start); the
  writer hides it for that import only, so a run does not load it and can still import it."""
  script = (
      "import importlib.util, sys\n"
      "from one_jax.training.metric_writers import MetricWriter\n"
      f"w = MetricWriter({str(tmp_path)!r})\n"
      "w.write_epoch(1, {'train/loss': 1.0}); w.write_steps(10, {'train/loss': 1.0}); w.close()\n"
      "assert 'torch' not in sys.modules, 'tensorboardX loaded torch'\n"
      "if importlib.util.find_spec('torch') is not None:\n"
      "  import torch; assert torch.zeros(2).sum().item() == 0\n"
      "print('ok')\n")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       check=False)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
  assert [t for _, t, _ in _scalars(_tb_events(str(tmp_path))[0][1])] == ["train/loss"]


def _history():
  """Two heads over 4 epochs; best is not final, and top-5 peaks at a different epoch."""
  top1_b0 = [0.50, 0.70, 0.65, 0.60]
  top1_ens = [0.55, 0.60, 0.80, 0.75]
  top5_b0 = [0.80, 0.85, 0.95, 0.90]
  top5_ens = [0.90, 0.97, 0.93, 0.96]
  return [{"epoch": e + 1, "train/loss": 2.0 - 0.3 * e, "train/ce_branch_0": 1.0 - 0.1 * e,
           "train/kl": 0.1 * e, "train/top1/branch_0": 0.5, "test/loss": 1.5 - 0.2 * e,
           "lr": 0.1 / (e + 1), "kl_weight": min(1.0, e / 2),
           "test/top1/branch_0": top1_b0[e], "test/top1/ensemble": top1_ens[e],
           "test/top5/branch_0": top5_b0[e], "test/top5/ensemble": top5_ens[e]}
          for e in range(4)]


def test_summary_table_final_vs_best():
  table = summary_table(_history(), ["branch_0", "ensemble"])
  lines = table.splitlines()
  header = lines[0]
  for label in ("final top-1", "best top-1 (epoch)", "final top-5", "best top-5"):
    assert label in header
  b0 = next(line for line in lines if line.startswith("branch_0")).split()
  ens = next(line for line in lines if line.startswith("ensemble")).split()
  # head, final top-1, best top-1, (epoch), final top-5, best top-5
  assert b0 == ["branch_0", "60.00%", "70.00%", "(2)", "90.00%", "95.00%"]
  assert ens == ["ensemble", "75.00%", "80.00%", "(3)", "96.00%", "97.00%"]


def test_summary_table_names_the_deployed_head():
  table = summary_table(_history(), ["branch_0", "ensemble"], deployed="ensemble")
  assert table.splitlines()[-1] == "deployed head: ensemble (it picks the best checkpoint)"
  assert "deployed" not in summary_table(_history(), ["branch_0", "ensemble"])


def test_summary_table_percent_input_and_missing_head():
  rows = [{"epoch": 1, "test/top1/model": 71.234}, {"epoch": 2, "test/top1/model": 70.5}]
  table = summary_table(rows, ["model", "absent"])
  model = next(line for line in table.splitlines() if line.startswith("model")).split()
  assert model == ["model", "70.50%", "71.23%", "(1)", "-", "-"]
  absent = next(line for line in table.splitlines() if line.startswith("absent")).split()
  assert absent == ["absent", "-", "-", "-", "-"]


def test_finish_writes_png_and_summary(tmp_path, capsys):
  workdir = str(tmp_path)
  writer = MetricWriter(workdir)
  for row in _history():
    writer.write_epoch(row["epoch"], {k: v for k, v in row.items() if k != "epoch"})
  table = writer.finish()
  writer.close()

  with open(os.path.join(workdir, "curves.png"), "rb") as f:
    png = f.read()
  assert png.startswith(PNG_MAGIC)
  assert len(png) > 10_000
  with open(os.path.join(workdir, "summary.txt")) as f:
    assert f.read().strip() == table.strip()
  assert table in capsys.readouterr().out
  assert "branch_0" in table and "ensemble" in table  # heads inferred from test/top1/* keys
  assert "80.00% (3)" in table


def test_loss_panel_selection():
  assert metric_writers._is_loss_key("train/loss")
  assert metric_writers._is_loss_key("train/ce_branches")
  assert metric_writers._is_loss_key("train/ce_branch_1")
  assert metric_writers._is_loss_key("train/kl")
  assert not metric_writers._is_loss_key("train/top1/ensemble")
  assert not metric_writers._is_loss_key("kl_weight")
  assert not metric_writers._is_loss_key("test/loss")


def test_disabled_writer_writes_nothing(tmp_path, capsys):
  workdir = os.path.join(str(tmp_path), "run")
  writer = MetricWriter(workdir, enabled=False, resume_epoch=5)
  writer.write_epoch(1, {"train/loss": 1.0, "test/top1/model": 0.5})
  assert writer.finish() == ""
  writer.close()
  assert not os.path.exists(workdir)
  assert capsys.readouterr().out == ""


def test_progress_bar_disabled_is_a_silent_noop(capsys):
  bar = progress_bar(100, "epoch 1", enabled=False)
  for _ in range(100):
    bar.update(1)
    bar.set_postfix(loss=1.0, img_s=123.4)
  bar.set_postfix({"loss": 1.0}, refresh=False)
  bar.set_description("x")
  bar.close()
  with progress_bar(3, "epoch 2", enabled=False) as bar:
    bar.update()
  captured = capsys.readouterr()
  assert captured.out == "" and captured.err == ""


def test_progress_bar_off_a_terminal_stays_short(capsys):
  bar = progress_bar(10_000, "epoch 1")
  assert bar.mininterval >= 5  # stderr is captured, not a TTY
  for _ in range(10_000):
    bar.update(1)
    bar.set_postfix(loss=1.0, img_s=123.4, refresh=False)
  bar.close()
  err = capsys.readouterr().err
  assert "epoch 1" in err and "10000/10000" in err
  assert err.count("\r") + err.count("\n") < 10
