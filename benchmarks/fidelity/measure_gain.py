"""ONE's gain over the baseline, measured in one_jax and in a PyTorch implementation of the
reference's training (benchmarks/fidelity/torch_train.py), for several seeds.

    python benchmarks/fidelity/measure_gain.py --npz=cifar10.npz --seeds=0,1,2,3 \
        --out_dir=runs/fidelity [--implementations=pytorch,one_jax] [--epochs=10 --depth=20 ...]

For every seed and implementation it trains the baseline ResNet and ONE with 3 branches with
the same recipe (defaults: ResNet-20, batch 128, SGD 0.1 / 0.9 / wd 1e-4, 10 epochs, lr x 0.1
at epochs 5 and 7, KL ramp-up over 80/300 of the run, T = 3), each run in its own process,
then writes OUT_DIR/results.json (every run) and OUT_DIR/results.md: the table of
`python -m one_jax.report OUT_DIR/*-seed*` (each run directory is a run the report reads: its
config.json and metrics.csv, with the field `implementation`), then per implementation the
mean and standard deviation over seeds of the baseline, the branch mean, the ensemble and the
gains (branch mean - baseline, ensemble - baseline, paired by seed). A run whose result file
exists is not repeated, and a run that was stopped continues from its last finished epoch
(torch_train.py --checkpoint; one_jax resumes its own workdir), so a measurement of many
hours can be spread over several sittings.
"""
import argparse
import csv
import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMPLEMENTATIONS = ("pytorch", "one_jax")
MODELS = ("baseline", "one")
sys.path.insert(0, REPO)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--implementations", default=",".join(IMPLEMENTATIONS))
  add_recipe_arguments(p)
  return p.parse_args(argv)


def add_recipe_arguments(p):
  """The data, the record and the recipe (also benchmarks/methods/measure_methods.py's)."""
  p.add_argument("--npz", required=True, help="CIFAR-10 as an .npz (arrays or packed JPEGs)")
  p.add_argument("--out_dir", required=True, help="run directories and the results table")
  p.add_argument("--seeds", default="0,1")
  p.add_argument("--depth", type=int, default=20)
  p.add_argument("--num_classes", type=int, default=10)
  p.add_argument("--epochs", type=int, default=10)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--milestones", default="5,7")
  p.add_argument("--rampup_fraction", type=float, default=80 / 300,
                 help="KL ramp-up length as a fraction of the run (the reference: 80 of 300)")
  p.add_argument("--steps_per_epoch", type=int, default=-1, help="> 0: cap (smoke runs)")
  p.add_argument("--threads", type=int, default=0, help="PyTorch intra-op threads (0: default)")


def _check(args):
  """One-line errors for bad arguments, before anything is written."""
  seeds, milestones = check_recipe(args)
  implementations = [s.strip() for s in args.implementations.split(",") if s.strip()]
  bad = [s for s in implementations if s not in IMPLEMENTATIONS]
  if bad or not implementations:
    raise ValueError(f"--implementations={args.implementations!r}: use one or more of "
                     f"{','.join(IMPLEMENTATIONS)}")
  return seeds, milestones, implementations


def check_recipe(args):
  """(seeds, milestones) of add_recipe_arguments' arguments, or a one-line ValueError."""
  if not os.path.isfile(args.npz):
    raise ValueError(f"--npz={args.npz!r} does not exist: pass CIFAR-10 as an .npz file")
  try:
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    milestones = [int(m) for m in args.milestones.split(",") if m.strip()]
  except ValueError:
    raise ValueError(f"--seeds={args.seeds!r} / --milestones={args.milestones!r} are invalid: "
                     "give comma-separated integers, e.g. --seeds=0,1,2") from None
  if not seeds:
    raise ValueError("--seeds is empty: give at least one seed, e.g. --seeds=0")
  return seeds, milestones


def _run(cmd, log_path):
  with open(log_path, "a", encoding="utf-8") as log:   # a resumed run adds to its log
    proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd[:3])} ... failed (exit {proc.returncode}): see {log_path}")


def recipe(args, seed, milestones) -> dict:
  """The run's one_jax config fields beyond its step1.py variant: the same recipe for both
  implementations (PyTorch's record states it in one_jax's terms)."""
  return {"npz_path": os.path.abspath(args.npz), "num_classes": args.num_classes,
          "depth": args.depth, "batch_size": args.batch, "num_epochs": args.epochs,
          "milestones": tuple(milestones), "rampup_epochs": args.epochs * args.rampup_fraction,
          "steps_per_epoch": args.steps_per_epoch, "seed": seed, "progress_bar": False}


def _variant(model):
  return "baseline" if model == "baseline" else "three_branch"


def _method_overrides(model, peers):
  """A branched run's --config.method ('one': ONE; benchmarks/methods runs the others) and its
  branch count for `peers` peers (OKDDip adds its leader)."""
  if model == "baseline":
    return {}
  from one_jax.training import methods  # pylint: disable=g-import-not-at-top
  return {"method": model, "num_branches": methods.branch_count(model, peers)}


def _write_record(run_dir, config, rows):
  """RUN_DIR/config.json and metrics.csv: the run as python -m one_jax.report reads it. Paths
  keep only their file names: a record names no directory of the machine it was made on."""
  from one_jax.storage import workdirs  # pylint: disable=g-import-not-at-top
  config = dict(config, **{field: ",".join(os.path.basename(p) for p in config[field].split(","))
                           for field in workdirs.PATH_FIELDS
                           if isinstance(config.get(field), str) and config[field]})
  with open(os.path.join(run_dir, workdirs.CONFIG_NAME), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  columns = list(dict.fromkeys(k for row in rows for k in row))
  with open(os.path.join(run_dir, workdirs.CSV_NAME), "w", encoding="utf-8", newline="") as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows(rows)


def pytorch_record(args, model, seed, milestones, top1) -> tuple:
  """(config, metrics rows) of a PyTorch run: one_jax's config of the same recipe marked
  `implementation: pytorch`, and one row per epoch, the last with the test top-1 of every head
  (the PyTorch trainer evaluates once, after its last epoch)."""
  from configs import step1  # pylint: disable=g-import-not-at-top
  from one_jax.storage import workdirs  # pylint: disable=g-import-not-at-top
  config = step1.get_config(_variant(model))
  config.update(recipe(args, seed, milestones))
  stored = dict(workdirs.as_json(config), implementation="pytorch")
  rows = [{"epoch": e} for e in range(1, args.epochs + 1)]
  rows[-1].update({f"test/top1/{head}": value / 100.0 for head, value in top1.items()})
  return stored, rows


def run_pytorch(args, model, seed, milestones, run_dir) -> dict:
  out = os.path.join(run_dir, "result.json")
  cmd = [sys.executable, os.path.join(REPO, "benchmarks", "fidelity", "torch_train.py"),
         f"--npz={args.npz}", f"--model={model}", f"--seed={seed}", f"--out={out}",
         f"--depth={args.depth}", f"--num_classes={args.num_classes}",
         f"--epochs={args.epochs}", f"--batch={args.batch}",
         f"--milestones={','.join(map(str, milestones))}",
         f"--rampup={args.epochs * args.rampup_fraction}",
         f"--steps_per_epoch={args.steps_per_epoch}", f"--threads={args.threads}",
         f"--checkpoint={os.path.join(run_dir, 'resume.pt')}"]
  _run(cmd, os.path.join(run_dir, "log.txt"))
  with open(out, encoding="utf-8") as f:
    top1 = json.load(f)["top1"]
  _write_record(run_dir, *pytorch_record(args, model, seed, milestones, top1))
  return top1


def run_one_jax(args, model, seed, milestones, run_dir) -> dict:
  """MODEL: 'baseline', or a method of one_jax's ('one', 'cl_ilr', ...) with 3 peers."""
  from one_jax.training import metric_writers  # pylint: disable=g-import-not-at-top
  from one_jax.storage import workdirs  # pylint: disable=g-import-not-at-top
  workdir = os.path.join(run_dir, "workdir")
  cmd = [sys.executable, "-m", "one_jax.main", f"--config=configs/step1.py:{_variant(model)}",
         f"--workdir={workdir}"] + [f"--config.{k}={v!r}" if isinstance(v, tuple) else
                                    f"--config.{k}={v}"
                                    for k, v in {**recipe(args, seed, milestones),
                                                 **_method_overrides(model, peers=3)}.items()]
  _run(cmd, os.path.join(run_dir, "log.txt"))
  history = metric_writers.load_history(workdir)
  _write_record(run_dir, dict(workdirs.stored_config(workdir), implementation="one_jax"),
                history)
  last = history[-1]
  return {k[len("test/top1/"):]: 100.0 * float(v) for k, v in last.items()
          if k.startswith("test/top1/")}


def _summary(values):
  values = np.asarray(values, float)
  spread = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
  return float(np.mean(values)), spread


def results_table(rows) -> str:
  """Markdown: per implementation, mean +- sample standard deviation over seeds, then the
  per-seed values (the gains are paired by seed)."""
  lines = ["| implementation | seeds | baseline | ONE-3 branches (mean) | ONE-3 ensemble | "
           "gain, branches | gain, ensemble |", "|---|---|---|---|---|---|---|"]
  for impl in IMPLEMENTATIONS:
    runs = {(r["seed"], r["model"]): r["top1"] for r in rows if r["implementation"] == impl}
    seeds = sorted({s for s, m in runs if (s, "baseline") in runs and (s, "one") in runs})
    if not seeds:
      continue
    base = [runs[(s, "baseline")]["model"] for s in seeds]
    branch = [runs[(s, "one")]["mean_branch"] for s in seeds]
    ens = [runs[(s, "one")]["ensemble"] for s in seeds]
    cells = []
    for values in (base, branch, ens, np.subtract(branch, base), np.subtract(ens, base)):
      mean, sd = _summary(values)
      per_seed = " / ".join(f"{v:.2f}" for v in values)
      spread = f" ± {sd:.2f}" if len(values) > 1 else ""   # the sample standard deviation
      cells.append(f"{mean:.2f}{spread} ({per_seed})")
    lines.append(f"| {impl} | {','.join(map(str, seeds))} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    seeds, milestones, implementations = _check(args)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  runners = {"pytorch": run_pytorch, "one_jax": run_one_jax}
  os.makedirs(args.out_dir, exist_ok=True)
  rows = []
  for seed in seeds:
    for impl in implementations:
      for model in MODELS:
        run_dir = os.path.join(args.out_dir, f"{impl}-{model}-seed{seed}")
        done = os.path.join(run_dir, "top1.json")
        if os.path.exists(done):
          with open(done, encoding="utf-8") as f:
            top1 = json.load(f)
        else:
          os.makedirs(run_dir, exist_ok=True)
          print(f"training {impl} {model}, seed {seed} ...", flush=True)
          top1 = runners[impl](args, model, seed, milestones, run_dir)
          with open(done, "w", encoding="utf-8") as f:
            json.dump(top1, f)
        rows.append({"implementation": impl, "model": model, "seed": seed, "top1": top1})
  from one_jax import report  # pylint: disable=g-import-not-at-top
  records = [report.read_run(os.path.join(args.out_dir, f"{r['implementation']}-{r['model']}-"
                                                        f"seed{r['seed']}")) for r in rows]
  table = report.render(records) + "\n" + results_table(rows)
  with open(os.path.join(args.out_dir, "results.json"), "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=1)
  write_table(args.out_dir, table)
  return 0


def write_table(out_dir, table):
  """OUT_DIR/results.md, also printed."""
  with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  sys.exit(main())
