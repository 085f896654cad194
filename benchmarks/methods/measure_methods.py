"""The online-distillation methods at one equal budget on CIFAR-10, several seeds each, as one
table of python -m one_jax.report.

    python benchmarks/methods/measure_methods.py --npz=cifar10.npz --seeds=2,3 \
        --methods=baseline,one,cl_ilr,okddip,dml,kdcl,ffl,pcl --out_dir=benchmarks/methods/results \
        --reuse=benchmarks/fidelity/results

The budget is benchmarks/fidelity's (`measure_gain.recipe`: ResNet-20, batch 128, SGD 0.1 /
0.9 / wd 1e-4, 10 epochs, lr x 0.1 at epochs 5 and 7, the KL ramp-up over 80/300 of the run,
3 peers; OKDDip adds its leader, `methods.branch_count`): between two runs of one seed only
`--config.method` differs (the baseline: one branch, cross-entropy), each method's options at
their defaults. Every run trains in its own
process into OUT_DIR/one_jax-METHOD-seedS, a run the report reads (config.json, metrics.csv,
log.txt, top1.json: benchmarks/fidelity's record). A run already recorded under OUT_DIR or
under a --reuse directory (the fidelity record holds the baseline's and ONE's) is not trained
again; a stopped run resumes its workdir.

OUT_DIR/results.md: the report's table of every run, then per method the deployed head's
final top-1 (mean ± sample sd over seeds, the per-seed values), its gain over the baseline
paired by seed, and the median epoch time (the first epoch, which compiles, left out).
"""
import argparse
import json
import os
import statistics
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks", "fidelity"))
import measure_gain  # noqa: E402  (benchmarks/ is not a package)

BASELINE = "baseline"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--methods", default="baseline,one,cl_ilr,okddip,dml,kdcl,ffl,pcl",
                 help="'baseline' and one_jax's methods (--config.method), comma-separated")
  p.add_argument("--reuse", default="",
                 help="comma-separated records whose finished runs count (e.g. the fidelity's)")
  measure_gain.add_recipe_arguments(p)
  return p.parse_args(argv)


def _check(args):
  from one_jax.training import methods  # pylint: disable=g-import-not-at-top
  seeds, milestones = measure_gain.check_recipe(args)
  names = [m.strip() for m in args.methods.split(",") if m.strip()]
  known = (BASELINE,) + tuple(methods.METHODS)
  if not names or any(m not in known for m in names):
    raise ValueError(f"--methods={args.methods!r}: use one or more of {','.join(known)}")
  reuse = [d for d in args.reuse.split(",") if d.strip()]
  missing = [d for d in reuse if not os.path.isdir(d)]
  if missing:
    raise ValueError(f"--reuse={args.reuse!r}: {missing[0]} is not a directory: give records "
                     "written by measure_gain.py or this script")
  return seeds, milestones, names, reuse


def _recorded(name, places):
  """The first of PLACES/NAME holding a finished run (its top1.json), else None."""
  for place in places:
    if os.path.exists(os.path.join(place, name, "top1.json")):
      return os.path.join(place, name)
  return None


def summary_table(records) -> str:
  """Markdown: per method, the deployed head's top-1, its gain over the baseline (paired by
  seed), and the median epoch time. RECORDS: {(method, seed): report.Run}."""
  from one_jax import report  # pylint: disable=g-import-not-at-top
  lines = ["| method | seeds | deployed head | top-1 | gain over the baseline | "
           "branches' mean | epoch time (s) |", "|---|---|---|---|---|---|---|"]
  for method in dict.fromkeys(m for m, _ in records):
    seeds = sorted(s for m, s in records if m == method)
    runs = [records[(method, s)] for s in seeds]
    deployed = [r.value(report.DEPLOYED, "top1", "final") for r in runs]
    paired = [s for s in seeds if (BASELINE, s) in records]
    gains = [records[(method, s)].value(report.DEPLOYED, "top1", "final")
             - records[(BASELINE, s)].value(report.DEPLOYED, "top1", "final") for s in paired]
    branch_mean = [r.value("mean_branch", "top1", "final") for r in runs]
    times = [row["epoch_time_s"] for r in runs for row in r.rows[1:] if "epoch_time_s" in row]
    lines.append("| " + " | ".join([
        method, ",".join(map(str, seeds)), runs[0].deployed, _mean_sd(deployed),
        "-" if method == BASELINE or not gains else _mean_sd(gains, signed=True),
        "-" if None in branch_mean else _mean_sd(branch_mean),
        f"{statistics.median(times):.1f}" if times else "not recorded"]) + " |")
  return "\n".join(lines) + "\n"


def _mean_sd(values, signed=False) -> str:
  fmt = "{:+.2f}" if signed else "{:.2f}"
  spread = f" ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else ""
  return (fmt.format(np.mean(values)) + spread + " (" + " / ".join(fmt.format(v) for v in values)
          + ")")


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    seeds, milestones, names, reuse = _check(args)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  from one_jax import report  # pylint: disable=g-import-not-at-top
  os.makedirs(args.out_dir, exist_ok=True)
  records = {}
  for seed in seeds:
    for method in names:
      name = f"one_jax-{method}-seed{seed}"
      run_dir = _recorded(name, [args.out_dir] + reuse)
      if run_dir is None:
        run_dir = os.path.join(args.out_dir, name)
        os.makedirs(run_dir, exist_ok=True)
        print(f"training {method}, seed {seed} ...", flush=True)
        top1 = measure_gain.run_one_jax(args, method, seed, milestones, run_dir)
        with open(os.path.join(run_dir, "top1.json"), "w", encoding="utf-8") as f:
          json.dump(top1, f)
      records[(method, seed)] = report.read_run(run_dir)
  ordered = [records[(m, s)] for m in names for s in seeds]
  table = report.render(ordered) + "\n" + summary_table(
      {(m, s): records[(m, s)] for m in names for s in seeds})
  measure_gain.write_table(args.out_dir, table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
