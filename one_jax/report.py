"""python -m one_jax.report RUN...: runs as one table of mean +- sd over seeds.

  python -m one_jax.report runs/one-seed* runs/baseline-seed*          # markdown, final top-1
  python -m one_jax.report runs/* --epoch=best --metric=top5 --format=latex
  python -m one_jax.report runs/* --format=csv --plot=curves.png

Each RUN is a workdir of `python -m one_jax.main` (its config.json and metrics). Runs whose
configs differ only by the seed (and by fields that do not change what is computed: the
resume-safe ones and paths, `GROUPING_IGNORES`, and the options of methods other than the
run's) form one group, one row of the table: the fields
that tell the groups apart ('absent' on a row whose config lacks one: a run recorded before the
field existed), then per head (each branch, the method's ensemble head, the
branches' mean, and `deployed`: each run's deployed head, one column across methods) the mean
+- sample sd over the group's runs and their number, of the final epoch's test accuracy
(`--epoch=best`: each run's best epoch of that head). A run with fewer epochs than its config
asks for is marked unfinished in its group's row. The protocol (metric, epoch rule, what +-
means) is printed under the table.
"""
import csv
import dataclasses
import io
import itertools
import logging
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from one_jax import cli
from one_jax.architectures import model_spec
from one_jax.storage import workdirs
from one_jax.training import methods, metric_writers

# Config fields that never tell two runs' results apart: the seed (what a group spans), the
# fields a run may change on resume but num_epochs (workdirs.SAFE_TO_CHANGE: the same numbers
# whatever their value), and paths (where the data or sources lie, which differ by seed in
# step-2 runs). The variant does tell them apart: two step-2 variants may differ only in what
# their sources are (merge_baselines and merge_one_branch: baselines or 1-branch models).
GROUPING_IGNORES = frozenset(
    {"seed"} | (set(workdirs.SAFE_TO_CHANGE) - {"num_epochs"}) | set(workdirs.PATH_FIELDS))
# Always in a row's label, in this order; then whatever else differs between the groups.
LABEL_FIELDS = ("variant", "model", "method", "depth", "num_branches", "dataset", "num_epochs")
FORMATS = ("markdown", "csv", "latex")
# The last column: each run's deployed head (methods.deployed_head: ONE's ensemble, OKDDip's
# leader, the others' peers' mean, a baseline's model), so that methods compare in one column.
DEPLOYED = "deployed"
# A row's label for a field its config does not have (a run recorded before the field existed).
ABSENT = "absent"


class ReportError(ValueError):
  """A directory that is not a run, or runs that cannot be reported together (one line)."""


@dataclasses.dataclass(frozen=True)
class Run:
  path: str
  config: Dict[str, Any]
  rows: List[dict]       # metrics per epoch (metric_writers.load_history)

  @property
  def finished(self) -> bool:
    return len(self.rows) >= int(self.config.get("num_epochs", 0))

  @property
  def method(self) -> Optional[str]:
    """The run's method (None: a baseline, which trains with cross-entropy)."""
    kind = model_spec.ARCHITECTURES.get(self.config.get("model"))
    method = None if kind is not None and not kind.branched else self.config.get("method", "one")
    if method is not None and method not in methods.METHODS:
      raise ReportError(f"{self.path} was trained with method {method!r}, which this one_jax "
                        f"does not know ({', '.join(methods.METHODS)}): report it with the "
                        "one_jax that trained it")
    return method

  @property
  def deployed(self) -> str:
    """The head this run deploys: its method's (methods.deployed_head)."""
    return methods.deployed_head(self.method)

  @property
  def compared_config(self) -> Dict[str, Any]:
    """The config fields that can tell this run's results from another's: all but
    GROUPING_IGNORES and the other methods' options (methods.unread_fields), which a run
    never reads, and which a run recorded before a method existed does not even have."""
    unread = GROUPING_IGNORES | methods.unread_fields(self.method)
    return {k: v for k, v in self.config.items() if k not in unread}

  def value(self, head: str, metric: str, epoch: str) -> Optional[float]:
    """The run's test `metric` of `head` in percent: the last epoch's, or its best epoch's;
    head DEPLOYED is the run's deployed head."""
    head = self.deployed if head == DEPLOYED else head
    final, best, _ = metric_writers.final_and_best(self.rows, f"test/{metric}/{head}")
    value = final if epoch == "final" else best
    return None if value is None else value * metric_writers.percent_scale(self.rows)


def read_run(path: str) -> Run:
  """The run in workdir `path`; a directory without a stored config and metrics is an error."""
  if not os.path.isdir(path):
    raise ReportError(f"{path} is not a directory: give the workdirs of python -m one_jax.main")
  try:
    config = workdirs.stored_config(path)
  except ValueError as e:
    raise ReportError(str(e)) from None
  rows = metric_writers.load_history(path)
  if config is None or not rows:
    missing = " and ".join(n for n, have in ((workdirs.CONFIG_NAME, config is not None),
                                            ("metrics", bool(rows))) if not have)
    raise ReportError(f"{path} is not a run directory (it has no {missing}): give the workdirs "
                      "of python -m one_jax.main, after at least one epoch")
  return Run(path=path, config=config, rows=rows)


def _hashable(value):
  return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def group_runs(runs: Sequence[Run]) -> List[List[Run]]:
  """Runs whose configs agree on every compared field (Run.compared_config), in first-seen
  order."""
  groups: Dict[Tuple, List[Run]] = {}
  for run in runs:
    key = tuple(sorted((k, _hashable(v)) for k, v in run.compared_config.items()))
    groups.setdefault(key, []).append(run)
  for members in groups.values():
    by_seed: Dict[Any, Run] = {}
    for run in members:
      seed = run.config.get("seed")
      if seed in by_seed:
        raise ReportError(f"{by_seed[seed].path} and {run.path} have the same config and seed "
                          f"({seed}): give each run once")
      by_seed[seed] = run
  return list(groups.values())


def _label_fields(groups: Sequence[List[Run]]) -> List[str]:
  configs = [g[0].compared_config for g in groups]
  # A field differs where two groups that read it disagree (a method's option is no column
  # beside the rows of other methods, which do not have it).
  differing = sorted({k for c in configs for k in c if k not in LABEL_FIELDS
                      and len({repr(cc[k]) for cc in configs if k in cc}) > 1})
  fields = [f for f in LABEL_FIELDS if any(f in c for c in configs)] + differing
  # Rows these columns cannot tell apart differ in which fields their configs have (a run
  # recorded before a field existed): those fields are columns too, 'absent' where missing.
  labels = [tuple(_label(g[0], f) for f in fields) for g in groups]
  missing = set()
  for i, j in itertools.combinations(range(len(groups)), 2):
    if labels[i] == labels[j]:
      missing |= set(configs[i]) ^ set(configs[j])
  return fields + sorted(missing - set(fields))


def _heads(groups) -> List[str]:
  heads: List[str] = []
  for group in groups:
    for run in group:
      for row in run.rows:
        heads.extend(h for h in metric_writers.heads_from_keys(list(row)) if h not in heads)
  return heads


@dataclasses.dataclass(frozen=True)
class Cell:
  values: Tuple[float, ...]

  @property
  def mean(self) -> float:
    return float(np.mean(self.values))

  @property
  def sd(self) -> Optional[float]:
    return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else None

  def text(self, plus_minus: str = "±") -> str:
    if not self.values:
      return "-"
    sd = "" if self.sd is None else f" {plus_minus} {self.sd:.2f}"
    return f"{self.mean:.2f}{sd} ({len(self.values)})"


def table(runs: Sequence[Run], metric: str = "top1", epoch: str = "final"):
  """(label fields, heads, rows): a row per group, (label values, {head: Cell}, status)."""
  groups = group_runs(runs)
  fields, heads = _label_fields(groups), _heads(groups) + [DEPLOYED]
  rows = []
  for group in groups:
    cells = {h: Cell(tuple(v for v in (r.value(h, metric, epoch) for r in group)
                           if v is not None and math.isfinite(v))) for h in heads}
    unfinished = [r for r in group if not r.finished]
    status = "" if not unfinished else "unfinished: " + ", ".join(
        f"{os.path.basename(os.path.normpath(r.path))} {len(r.rows)}/"
        f"{r.config.get('num_epochs')} epochs" for r in unfinished)
    rows.append(([_label(group[0], f) for f in fields], cells, status))
  return fields, heads, rows


def _label(run: Run, field: str) -> str:
  """A row's value of `field`: '-' where its runs do not read it (another method's option) or
  have no method (a baseline trains with cross-entropy); ABSENT where their config does not
  have a field they would read."""
  if field == "method":
    return _text(run.method)
  if field not in run.config and field not in methods.unread_fields(run.method):
    return ABSENT
  return _text(run.compared_config.get(field))


def _text(value) -> str:
  return "-" if value is None else ",".join(map(str, value)) if isinstance(value, list) else str(value)


def protocol(metric: str, epoch: str, absent: bool = False) -> str:
  """What the table's numbers are; absent: say what an ABSENT label means (it has one)."""
  which = "the final epoch's" if epoch == "final" else "each run's best epoch's"
  return (f"Test {metric.replace('top', 'top-')} accuracy (%), {which} per run; mean ± sample sd "
          "over the runs of a row (the seeds), their number in brackets; deployed: the head "
          "each run deploys (ONE's ensemble, OKDDip's leader, the peers' mean of CL-ILR, DML and "
          "KDCL, FFL's fused classifier, PCL's temporal-mean ensemble, a baseline's model); '-': "
          "a field the row's runs do not read (another method's option) or a head they lack"
          + (f"; '{ABSENT}': a field the row's config.json does not have (recorded before the "
             "field existed, or by a config without it)" if absent else "") + ".")


def render(runs: Sequence[Run], metric: str = "top1", epoch: str = "final",
           fmt: str = "markdown") -> str:
  """The table in markdown (with the protocol under it), CSV or LaTeX."""
  fields, heads, rows = table(runs, metric, epoch)
  status_column = any(status for _, _, status in rows)
  absent = any(ABSENT in labels for labels, _, _ in rows)
  if fmt == "csv":
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(fields + [f"{h}_{s}" for h in heads for s in ("mean", "sd", "n")]
                    + ["status"])
    for labels, cells, status in rows:
      values = []
      for h in heads:
        c = cells[h]
        values += (["", "", 0] if not c.values else
                   [f"{c.mean:.4f}", "" if c.sd is None else f"{c.sd:.4f}", len(c.values)])
      writer.writerow(labels + values + [status])
    return out.getvalue()
  header = fields + heads + (["status"] if status_column else [])
  body = [labels + [cells[h].text("±" if fmt == "markdown" else r"$\pm$") for h in heads]
          + ([status] if status_column else []) for labels, cells, status in rows]
  if fmt == "latex":
    escape = lambda s: s.replace("_", r"\_").replace("%", r"\%")  # noqa: E731
    lines = [r"\begin{tabular}{" + "l" * len(fields) + "r" * (len(header) - len(fields)) + "}",
             r"\hline", " & ".join(escape(h) for h in header) + r" \\", r"\hline"]
    lines += [" & ".join(escape(c) for c in row) + r" \\" for row in body]
    lines += [r"\hline", r"\end{tabular}", "% " + protocol(metric, epoch, absent)]
    return "\n".join(lines) + "\n"
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in body]
  return "\n".join(lines) + "\n\n" + protocol(metric, epoch, absent) + "\n"


def plot(runs: Sequence[Run], path: str, metric: str = "top1") -> None:
  """Mean and band (+- sd) over each group's runs of its deployed head's test metric per
  epoch ('ensemble', 'peers_mean' or a baseline's 'model')."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  groups = group_runs(runs)
  fields = _label_fields(groups)
  fig = Figure(figsize=(7.0, 4.5), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  for group in groups:
    head = group[0].deployed
    epochs = min(len(r.rows) for r in group)
    key = f"test/{metric}/{head}"
    values = np.array([[row.get(key, np.nan) * metric_writers.percent_scale(r.rows)
                        for row in r.rows[:epochs]] for r in group])
    mean, sd = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
    xs = np.arange(1, epochs + 1)
    label = " ".join(_label(group[0], f) for f in fields) + f" [{head}, n={len(group)}]"
    ax.plot(xs, mean, label=label, linewidth=1.2)
    ax.fill_between(xs, mean - sd, mean + sd, alpha=0.2)
  ax.set_xlabel("epoch")
  ax.set_ylabel(f"test {metric.replace('top', 'top-')} (%)")
  ax.legend(fontsize="small")
  partial = f"{path}.partial-{os.getpid()}"   # a failed save leaves nothing at `path`
  try:
    fig.savefig(partial, format="png")
    os.replace(partial, path)
  finally:
    if os.path.exists(partial):
      os.remove(partial)


def _parser():
  p = cli.ArgumentParser(prog="python -m one_jax.report",
                         description="Runs as one table: mean ± sd over seeds per head.")
  p.add_argument("runs", nargs="+", help="workdirs of python -m one_jax.main")
  p.add_argument("--metric", choices=("top1", "top5"), default="top1")
  p.add_argument("--epoch", choices=("final", "best"), default="final",
                 help="each run's final epoch, or its best epoch of each head")
  p.add_argument("--format", choices=FORMATS, default="markdown")
  p.add_argument("--plot", default="", help="also write the curves (mean and band) to this PNG")
  return p


def _run(argv) -> None:
  args = _parser().parse_args(argv)
  runs = [read_run(path) for path in args.runs]
  text = render(runs, args.metric, args.epoch, args.format)
  if args.plot:
    if os.path.exists(args.plot):
      raise ReportError(f"{args.plot} exists: give a new file for --plot")
    plot(runs, args.plot, args.metric)
  sys.stdout.write(text)


def main(argv=None) -> int:
  return cli.exit_status(_run, argv)


def run():
  """Console entry (`one-jax-report`)."""
  logging.getLogger("absl").setLevel(logging.ERROR)
  sys.exit(main())


if __name__ == "__main__":
  run()
