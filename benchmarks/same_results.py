"""Do two checkouts of one_jax train to the same bits? For refactorings that must not change
what a run computes.

    python benchmarks/same_results.py OLD_CHECKOUT NEW_CHECKOUT [--out DIR]

Runs, in each checkout (as `python -m one_jax.main` from its root, the command line users
type), the smoke form of every configs/step1.py variant, the step-2 variants from those runs'
checkpoints, and one configs/paper.py row per family plus the ImageNet ResNet; then reads every
final checkpoint with this checkout's one_jax (so the old checkpoints must load) and prints one
line per run: identical (every array bit for bit, and metrics.csv but for its timings) or what
differs. Exit status 1 if anything differs.
"""
import argparse
import csv
import os
import subprocess
import sys

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from one_jax.storage import checkpoints  # noqa: E402  (this checkout's reader)

STEP1 = ("baseline", "three_branch", "five_branch", "baseline_after_lr", "five_branch_after_lr",
         "baseline_top5", "five_branch_top5")
STEP2_SOURCES = ("one_branch", "three_branch", "five_branch")
# variant -> the config fields naming its sources, from the runs above.
STEP2 = {"three_into_five": "--config.source={s2_three_branch}",
         "merge_baselines": "--config.sources={s1_baseline},{s1_baseline},{s1_baseline}",
         "merge_one_branch": "--config.sources={s2_one_branch},{s2_one_branch},{s2_one_branch}",
         "one_into_three": "--config.source={s2_one_branch}",
         "one_inside_three": "--config.source={s2_one_branch}",
         "five_branch_vote": "--config.source={s2_five_branch}"}
PAPER = ("resnet32_cifar10", "wrn16_4_cifar10", "vgg16_cifar10", "densenet40_12_cifar10",
         "resnext29_8x64d_cifar10")
TIMINGS = ("epoch_time_s", "train_images_per_sec")


def runs():
  """[(name, config argument, extra arguments)] in dependency order."""
  out = [(f"s1_{v}", f"configs/step1.py:{v},smoke", "") for v in STEP1]
  out += [(f"s2_{v}", f"configs/step2.py:{v},smoke", "") for v in STEP2_SOURCES]
  out += [(f"s2_{v}", f"configs/step2.py:{v},smoke", extra) for v, extra in STEP2.items()]
  out += [(f"paper_{v}", f"configs/paper.py:{v},smoke", "") for v in PAPER]
  out += [("imagenet_resnet18_one", "configs/imagenet.py:resnet18_one,smoke", "")]
  return out


def run_all(checkout: str, out_dir: str) -> None:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  dirs = {}
  for name, config, extra in runs():
    workdir = os.path.join(out_dir, name)
    dirs[name] = workdir
    args = [sys.executable, "-m", "one_jax.main", f"--config={config}", f"--workdir={workdir}",
            "--config.progress_bar=False"] + [a.format(**dirs) for a in extra.split() if a]
    proc = subprocess.run(args, cwd=checkout, env=env, capture_output=True, text=True,
                          check=False)
    print(f"{checkout}: {name}: exit {proc.returncode}", flush=True)
    if proc.returncode:
      print(proc.stderr[-2000:], flush=True)


def _csv(path):
  if not os.path.exists(path):
    return None
  with open(path, newline="") as f:
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in csv.DictReader(f)]


def compare(old_dir: str, new_dir: str, name: str) -> str:
  a, b = os.path.join(old_dir, name), os.path.join(new_dir, name)
  if os.path.isdir(os.path.join(a, "checkpoints")):
    raw_a, meta_a = checkpoints.restore_raw(a)
    raw_b, meta_b = checkpoints.restore_raw(b)
    if jax.tree.structure(raw_a) != jax.tree.structure(raw_b):
      return "different state structure"
    bad = [jax.tree_util.keystr(p) for p, x, y in zip(
        *zip(*jax.tree_util.tree_flatten_with_path(raw_a)[0]),
        jax.tree.leaves(raw_b)) if not np.array_equal(np.asarray(x), np.asarray(y))]
    if bad:
      return f"{len(bad)} arrays differ, e.g. {bad[0]}"
    if meta_a["step"] != meta_b["step"]:
      return f"steps {meta_a['step']} vs {meta_b['step']}"
  for result in ("metrics.csv", "eval.json", "voting.csv"):
    if result == "metrics.csv":
      same = _csv(os.path.join(a, result)) == _csv(os.path.join(b, result))
    else:
      pa, pb = os.path.join(a, result), os.path.join(b, result)
      same = (not os.path.exists(pa) and not os.path.exists(pb)) or (
          os.path.exists(pa) and os.path.exists(pb) and open(pa).read() == open(pb).read())
    if not same:
      return f"{result} differs"
  return "identical"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("old")
  parser.add_argument("new")
  parser.add_argument("--out", default="/tmp/one_jax_same_results")
  args = parser.parse_args()
  outs = []
  for label, checkout in (("old", args.old), ("new", args.new)):
    out = os.path.join(args.out, label)
    os.makedirs(out, exist_ok=True)
    run_all(os.path.abspath(checkout), out)
    outs.append(out)
  verdicts = {name: compare(*outs, name) for name, _, _ in runs()}
  for name, verdict in verdicts.items():
    print(f"{name}: {verdict}")
  sys.exit(0 if all(v == "identical" for v in verdicts.values()) else 1)


if __name__ == "__main__":
  main()
