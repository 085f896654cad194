"""Step 1: the foundations — the baseline, ONE with 3 and 5 branches, and their variants.

Run (DESIGN.md section 8):

  python -m one_jax.main --config=configs/step1.py:five_branch --workdir=runs/five_branch

Variants: baseline, three_branch (the ONE paper), five_branch, baseline_after_lr and
five_branch_after_lr (gradient-ratio learning rates, geo_lr = 1), baseline_top5 and
five_branch_top5 (the multistep schedule with gamma 0.333). Append ',smoke' for a tiny
synthetic run and ',deterministic' for deterministic kernels, e.g.
`--config=configs/step1.py:five_branch,smoke`. Expected on CIFAR-10 with the full 300 epochs:
ONE-ResNet32 ensemble above the baseline's ~93% top-1 (the paper reports 94.4% on the original
CIFAR-10; the JPEG copy in shared data gives slightly less).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402  (configs/ is loaded by path, not as a package)

VARIANTS = ("baseline", "three_branch", "five_branch", "baseline_after_lr",
            "five_branch_after_lr", "baseline_top5", "five_branch_top5")


def get_config(arg=None):
  variant, flags = common.parse_arg(arg or "three_branch", VARIANTS)
  c = common.base_config()
  c.variant = variant
  if variant.startswith("baseline"):
    c.model = "cifar_resnet"
    c.num_branches = 1
  else:
    c.model = "one_resnet"
    c.num_branches = 5 if variant.startswith("five_branch") else 3
  if variant.endswith("after_lr"):
    c.geo_lr = 1
  if variant.endswith("top5"):
    c.gamma = 0.333
  if "smoke" in flags:
    common.apply_smoke(c)
  c.deterministic = "deterministic" in flags
  return c
