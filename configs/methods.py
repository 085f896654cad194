"""The online-distillation methods at the recipe of the papers that compare them, on any
configs/paper.py architecture: `METHOD[:ROW]` (ROW a configs/paper.py variant, default
resnet32_cifar100, the comparison tables' usual row), then ',smoke' or ',deterministic'.

  python -m one_jax.main --config=configs/methods.py:cl_ilr --workdir=runs/cl
  python -m one_jax.main --config=configs/methods.py:cl_ilr:resnet110_peers_cifar100 --workdir=runs/cl110
  python -m one_jax.main --config=configs/methods.py:dml:vgg16_cifar10,smoke --workdir=runs/dml
  python -m one_jax.main --config=configs/methods.py:one:vgg16_cifar10,smoke --workdir=runs/s

The recipe (OKDDip, MCL-OKD, the PCL reproduction): 3 peers (OKDDip: 3 peers and its group
leader, 4 branches), SGD with Nesterov momentum 0.9,
weight decay 5e-4, batch 128, 300 epochs, lr 0.1 divided by 10 at epochs 150 and 225, the KL
ramp-up over 80 epochs; each method's options at its first-named source's defaults (README,
"Methods"). Equal budgets: only the method differs between two variants of one row.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import paper  # noqa: E402  (configs/ is loaded by path, not as a package)
from one_jax.architectures import models  # noqa: E402
from one_jax.training import methods  # noqa: E402

METHODS = tuple(models.ENSEMBLES)   # every method one_jax implements
DEFAULT_ROW = "resnet32_cifar100"


def get_config(arg=None):
  head, _, tail = (arg or "one").partition(",")
  method, _, row = head.partition(":")
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}, optionally "
                     f"followed by ':ROW' (a configs/paper.py variant, default {DEFAULT_ROW})")
  c = paper.get_config(",".join(p for p in (row or DEFAULT_ROW, tail) if p))
  c.variant = f"{method}_{c.variant}"
  c.method = method
  c.num_branches = methods.branch_count(method, c.num_branches)
  c.weight_decay, c.nesterov, c.momentum = 5e-4, True, 0.9
  if c.num_epochs == 300:   # not the smoke run's
    c.milestones = (150, 225)
  return c
