"""What a training run writes into its workdir: per-epoch metrics, curves and a summary.

Per epoch: workdir/metrics.csv (one row per epoch, one column per metric), workdir/metrics.jsonl
(one JSON object per epoch) and TensorBoard scalars in workdir/tensorboard (step = epoch).
Every log_every_steps steps (when on): workdir/steps.jsonl (one JSON object per log point,
'step' = global step) and TensorBoard scalars in workdir/tensorboard/steps (step = global step).
At the end: workdir/curves.png and workdir/summary.txt (final vs best test accuracy per head).

Accuracies ('.../top1/<head>', '.../top5/<head>') are expected as fractions in [0, 1] (what
mean(prediction == label) gives) and are shown as percentages; a history whose accuracies
already exceed 1 is taken to be in percent and shown as is.

Only process 0 of a multi-host run writes: the others build the writer with enabled=False,
which makes every method a no-op.
"""
import csv
import io
import json
import math
import os
import sys
import uuid
from typing import Dict, List, Optional, Sequence

import numpy as np
from tqdm import tqdm

from one_jax import validate
from one_jax.storage import workdirs

STEPS_JSONL_NAME = "steps.jsonl"
STEPS_TB_SUBDIR = "steps"
TB_DIR = "tensorboard"

_LOSS_WORDS = ("loss", "ce", "kl")
_ACC_WORDS = ("top1", "top5", "acc")


def _tensorboardx():
  """tensorboardX, imported without PyTorch where PyTorch is installed but not yet loaded.

  tensorboardX imports torch at import time, only to accept torch tensors in add_* calls: a
  second or more of every run's start (the [torch] extra installs it). These writers log Python
  floats, so torch is hidden for that one import (None in sys.modules makes `import torch`
  raise ImportError, the path tensorboardX takes without PyTorch) and restored right after.
  """
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    import tensorboardX  # pylint: disable=g-import-not-at-top
    return tensorboardX
  sys.modules["torch"] = None
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    if sys.modules.get("torch", 0) is None:
      del sys.modules["torch"]
  return tensorboardX


def _atomic_write(path: str, data, mode: str = "w"):
  """Writes via a temp file + os.replace, so a crash leaves the old file or the new one."""
  tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.tmp")
  kwargs = {"encoding": "utf-8", "newline": ""} if "b" not in mode else {}
  with open(tmp, mode, **kwargs) as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _to_number(name: str, value):
  """A Python int or float from a float/int/numpy/jax scalar; anything else is a caller bug."""
  if isinstance(value, bool) or isinstance(value, (str, bytes)):
    raise TypeError(f"metric {name!r}: expected a number, got {type(value).__name__} {value!r}")
  if type(value) in (int, float):  # exact types: numpy's float64 subclasses float
    return value
  try:
    arr = np.asarray(value)
  except Exception as e:  # e.g. an object numpy cannot convert
    raise TypeError(f"metric {name!r}: expected a number, got {type(value).__name__}") from e
  if arr.size != 1 or arr.dtype.kind not in "iuf":
    raise TypeError(f"metric {name!r}: expected a scalar number, got {arr.dtype} array of "
                    f"shape {arr.shape}")
  return int(arr.reshape(())) if arr.dtype.kind in "iu" else float(arr.reshape(()))


def _parse_csv_value(text: str):
  if text == "":
    return None
  try:
    return int(text)
  except ValueError:
    try:
      return float(text)
    except ValueError:
      return None


def _read_csv(path: str):
  """(header, rows) of an existing metrics.csv; ([], []) if absent or unreadable."""
  try:
    with open(path, encoding="utf-8", newline="") as f:
      reader = csv.reader(f)
      header = next(reader, [])
      rows = []
      for fields in reader:
        row = {}
        for key, text in zip(header, fields):
          value = _parse_csv_value(text)
          if value is not None:
            row[key] = value
        if isinstance(row.get("epoch"), int):
          rows.append(row)
      return header, rows
  except (OSError, csv.Error, UnicodeDecodeError):
    return [], []


def _read_jsonl(path: str, key: str = "epoch"):
  """Rows of an existing metrics.jsonl (steps.jsonl: key='step'); a torn last line (crash
  mid-append) is skipped."""
  rows = []
  try:
    with open(path, encoding="utf-8") as f:
      for line in f:
        try:
          row = json.loads(line)
        except ValueError:
          continue
        if isinstance(row, dict) and isinstance(row.get(key), int):
          rows.append(row)
  except (OSError, UnicodeDecodeError):
    pass
  return rows


def load_history(workdir: str) -> List[dict]:
  """The logged rows of a workdir, sorted by epoch (JSONL values win over the CSV's)."""
  _, csv_rows = _read_csv(os.path.join(workdir, workdirs.CSV_NAME))
  by_epoch = {row["epoch"]: row for row in csv_rows}
  by_epoch.update({row["epoch"]: row for row in _read_jsonl(os.path.join(workdir, workdirs.JSONL_NAME))})
  return [by_epoch[e] for e in sorted(by_epoch)]


class MetricWriter:
  """Writes one row of metrics per completed epoch to CSV, JSONL and TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool = True, resume_epoch: int = 0,
               resume_step: int = 0):
    self.workdir = workdir
    self.enabled = bool(enabled)
    self._rows: List[dict] = []
    self._keys: List[str] = ["epoch"]
    self._tb = None
    self._steps_tb = None
    self._resume_step = resume_step
    if not self.enabled:
      return
    resume_epoch = validate.check_int("resume_epoch", resume_epoch, minimum=0)
    resume_step = validate.check_int("resume_step", resume_step, minimum=0)
    self._steps_path = os.path.join(workdir, STEPS_JSONL_NAME)
    if os.path.exists(self._steps_path):  # drop log points after the checkpoint resumed from
      kept = [r for r in _read_jsonl(self._steps_path, "step") if r["step"] <= resume_step]
      _atomic_write(self._steps_path, "".join(json.dumps(r) + "\n" for r in kept))
    os.makedirs(workdir, exist_ok=True)
    self._csv_path = os.path.join(workdir, workdirs.CSV_NAME)
    self._jsonl_path = os.path.join(workdir, workdirs.JSONL_NAME)

    # Keep the epochs up to resume_epoch: a crash may have logged an epoch whose checkpoint
    # never landed, and the resumed run logs it again.
    header, _ = _read_csv(self._csv_path)
    self._rows = [r for r in load_history(workdir) if r["epoch"] <= resume_epoch]
    present = {k for row in self._rows for k in row}
    order = header + [k for row in self._rows for k in row]
    for key in order:
      if key in present and key not in self._keys:
        self._keys.append(key)
    if os.path.exists(self._csv_path) or os.path.exists(self._jsonl_path):
      self._write_csv()
      self._write_jsonl_all()

    tensorboardX = _tensorboardx()
    tb_dir = os.path.join(workdir, TB_DIR)
    had_events = os.path.isdir(tb_dir) and any("tfevents" in n for n in os.listdir(tb_dir))
    # purge_step hides TensorBoard events from the dropped epochs, so curves do not double.
    self._tb = tensorboardX.SummaryWriter(
        logdir=tb_dir,
        purge_step=resume_epoch + 1 if (resume_epoch > 0 or had_events) else None,
        # Unique per writer: two writers started in the same second would share a file name.
        filename_suffix=f".{os.getpid()}.{uuid.uuid4().hex[:8]}")

  @property
  def rows(self) -> List[dict]:
    """The history so far (after resume truncation), one dict per epoch."""
    return [dict(r) for r in self._rows]

  def write_epoch(self, epoch: int, metrics: Dict[str, float]) -> None:
    """Logs the metrics of completed epoch `epoch` (1-based)."""
    if not self.enabled:
      return
    epoch = validate.check_int("epoch", epoch, minimum=1,
                                    why="it must be an integer >= 1 (completed epochs)")
    row = {"epoch": epoch}
    for name, value in metrics.items():
      if not isinstance(name, str) or not name:
        raise TypeError(f"metric names must be non-empty strings, got {name!r}")
      if name == "epoch":
        if _to_number(name, value) != epoch:
          raise ValueError(f"metrics['epoch']={value!r} disagrees with epoch={epoch}")
        continue
      row[name] = _to_number(name, value)
    for key in row:
      if key not in self._keys:
        self._keys.append(key)

    in_order = not self._rows or epoch > self._rows[-1]["epoch"]
    self._rows = sorted([r for r in self._rows if r["epoch"] != epoch] + [row],
                        key=lambda r: r["epoch"])
    if in_order:
      with open(self._jsonl_path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
    else:  # an epoch logged again or out of order: keep one line per epoch
      self._write_jsonl_all()
    self._write_csv()

    for name, value in row.items():
      if name != "epoch":
        self._tb.add_scalar(name, value, global_step=epoch)
    self._tb.flush()

  def write_steps(self, step: int, metrics: Dict[str, float]) -> None:
    """Logs the metrics of the steps up to global step `step` (a per-step log point)."""
    if not self.enabled:
      return
    row = dict({"step": int(step)}, **{k: _to_number(k, v) for k, v in metrics.items()})
    with open(self._steps_path, "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")
    if self._steps_tb is None:
      self._steps_tb = _tensorboardx().SummaryWriter(
          logdir=os.path.join(self.workdir, TB_DIR, STEPS_TB_SUBDIR),
          purge_step=self._resume_step + 1 if self._resume_step else None,
          filename_suffix=f".{os.getpid()}.{uuid.uuid4().hex[:8]}")
    for name, value in row.items():
      if name != "step":
        self._steps_tb.add_scalar(name, value, global_step=row["step"])

  def _write_csv(self):
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(self._keys)
    for row in self._rows:
      writer.writerow(["" if row.get(k) is None else repr(row[k]) for k in self._keys])
    _atomic_write(self._csv_path, buf.getvalue())

  def _write_jsonl_all(self):
    _atomic_write(self._jsonl_path, "".join(json.dumps(r) + "\n" for r in self._rows))

  def finish(self, heads: Optional[Sequence[str]] = None, deployed: Optional[str] = None) -> str:
    """Writes curves.png and summary.txt; returns (and prints) the summary table (naming the
    `deployed` head when given)."""
    if not self.enabled:
      return ""
    if self._tb is not None:
      self._tb.flush()
    if not self._rows:  # e.g. a finished run whose metrics files were deleted: keep its summary
      print(f"no epochs in {os.path.join(self.workdir, workdirs.JSONL_NAME)} to summarise: "
            f"{workdirs.SUMMARY_NAME} and {workdirs.PLOT_NAME} were left as they were", flush=True)
      return ""
    if heads is None:
      heads = heads_from_keys(self._keys)
    plot_curves(self._rows, os.path.join(self.workdir, workdirs.PLOT_NAME))
    last = self._rows[-1]["epoch"] if self._rows else 0
    table = f"Test accuracy after {last} epochs:\n" + summary_table(self._rows, list(heads),
                                                                    deployed)
    _atomic_write(os.path.join(self.workdir, workdirs.SUMMARY_NAME), table + "\n")
    print(table, flush=True)
    return table

  def close(self):
    for tb in (self._tb, self._steps_tb):
      if tb is not None:
        tb.close()
    self._tb = self._steps_tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def heads_from_keys(keys: Sequence[str]) -> List[str]:
  """Heads in first-seen order from 'test/top1/<head>' keys."""
  prefix = "test/top1/"
  return [k[len(prefix):] for k in keys if k.startswith(prefix)]


def percent_scale(rows: Sequence[dict]) -> float:
  """100 if accuracies are fractions (all <= 1), else 1 (already percentages)."""
  values = [v for r in rows for k, v in r.items()
            if ("/top1/" in k or "/top5/" in k) and isinstance(v, (int, float)) and math.isfinite(v)]
  return 1.0 if values and max(values) > 1.0 else 100.0


def final_and_best(rows: Sequence[dict], key: str):
  """(final value, best value, epoch of the first best) of `key`; None where never logged."""
  final = best = best_epoch = None
  for i, row in enumerate(rows):
    value = row.get(key)
    if value is None:
      continue
    final = value
    if not math.isnan(value) and (best is None or value > best):
      best, best_epoch = value, row.get("epoch", i + 1)
  return final, best, best_epoch


def summary_table(rows: List[dict], heads: List[str], deployed: Optional[str] = None) -> str:
  """Final vs best test top-1/top-5 per head, as percentages with 2 decimals; then, given the
  `deployed` head, a line naming it."""
  scale = percent_scale(rows)
  fmt = lambda v: "-" if v is None else f"{v * scale:.2f}%"
  header = ["head", "final top-1", "best top-1 (epoch)", "final top-5", "best top-5"]
  lines = []
  for head in heads:
    f1, b1, e1 = final_and_best(rows, f"test/top1/{head}")
    f5, b5, _ = final_and_best(rows, f"test/top5/{head}")
    best1 = "-" if b1 is None else f"{fmt(b1)} ({e1})"
    lines.append([head, fmt(f1), best1, fmt(f5), fmt(b5)])
  widths = [max(len(r[i]) for r in [header] + lines) for i in range(len(header))]
  just = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths))).rstrip()
  out = [just(header), "  ".join("-" * w for w in widths)] + [just(r) for r in lines]
  if deployed is not None:
    out.append(f"deployed head: {deployed} (it picks the best checkpoint)")
  return "\n".join(out)


def _is_loss_key(key: str) -> bool:
  if not key.startswith("train/"):
    return False
  name = key[len("train/"):]
  return any(w in name for w in _LOSS_WORDS) and not any(w in name for w in _ACC_WORDS)


def plot_curves(rows: Sequence[dict], path: str) -> None:
  """Loss, test top-1 per head, lr and kl_weight against epoch, saved as a PNG."""
  # The Agg canvas directly: no pyplot state, no display, no global backend switch.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  keys = []
  for row in rows:
    keys.extend(k for k in row if k not in keys)
  scale = percent_scale(rows)
  panels = []  # (title, ylabel, [(key, label, style)], yscale factor)
  losses = [(k, k[len("train/"):], "-") for k in keys if _is_loss_key(k)]
  losses += [(k, k, "--") for k in keys if k == "test/loss"]
  if losses:
    panels.append(("losses (train; test dashed)", "loss", losses, 1.0))
  accs = [(k, k[len("test/top1/"):], "-") for k in keys if k.startswith("test/top1/")]
  if accs:
    panels.append(("test top-1 accuracy", "top-1 (%)", accs, scale))
  for key, title in (("lr", "learning rate"), ("kl_weight", "kl_weight")):
    if key in keys:
      panels.append((title, key, [(key, key, "-")], 1.0))

  ncols = min(2, max(1, len(panels)))
  nrows = max(1, math.ceil(len(panels) / ncols))
  fig = Figure(figsize=(6.4 * ncols, 4.0 * nrows), dpi=100)
  FigureCanvasAgg(fig)
  marker = "." if len(rows) <= 50 else None
  if not panels:
    ax = fig.add_subplot(1, 1, 1)
    ax.text(0.5, 0.5, "no metrics logged", ha="center", va="center")
    ax.set_axis_off()
  for i, (title, ylabel, lines, factor) in enumerate(panels):
    ax = fig.add_subplot(nrows, ncols, i + 1)
    for key, label, style in lines:
      points = [(r["epoch"], r[key] * factor) for r in rows if r.get(key) is not None]
      if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, style, marker=marker, label=label, linewidth=1.2)
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if len(lines) > 1:
      ax.legend(fontsize="small")
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  _atomic_write(path, buf.getvalue(), mode="wb")


def progress_bar(total: int, desc: str, enabled: bool = True):
  """A per-epoch tqdm bar on stderr; disabled (draws nothing) where `enabled` is False."""
  stream = sys.stderr
  try:
    tty = stream.isatty()
  except (AttributeError, ValueError):
    tty = False
  # Off a terminal every refresh is a new line in the log: refresh rarely there.
  return tqdm(total=total, desc=desc, file=stream, unit="step", dynamic_ncols=tty,
              mininterval=0.1 if tty else 5.0, maxinterval=10.0 if tty else 60.0,
              leave=True, ascii=not tty, disable=not enabled)
