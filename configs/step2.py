"""Step 2: two-stage cooperative networks — grow, merge and vote with trained branches.

Stage-1 runs (the first three variants) produce the sources; the others take them from
config fields, perform their surgery once into WORKDIR/init, train on and evaluate:

  python -m one_jax.main --config=configs/step2.py:three_branch --workdir=runs/s1_three
  python -m one_jax.main --config=configs/step2.py:three_into_five \
      --config.source=runs/s1_three --workdir=runs/s2_three_into_five

Variants (DESIGN.md section 8):
  one_branch, three_branch, five_branch   stage-1 ONE models with 1, 3, 5 branches
  five_branch_vote     evaluate a 5-branch model (--config.source) and every branch subset
  three_into_five      3 -> 5 branches, copy mode (ensemble unchanged at the start), the
                       copies' momentum perturbed so that they part during training
  merge_baselines      three baseline ResNets (--config.sources=A,B,C) -> one 3-branch model
  merge_one_branch     three 1-branch ONE models -> one 3-branch model
  one_into_three       a 1-branch model grown to 3 with the copies perturbed (symmetry broken)
  one_inside_three     the control: exact copies, which get identical updates and stay identical
Append ',smoke' for tiny synthetic runs (sources must then be smoke runs too).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402  (configs/ is loaded by path, not as a package)

VARIANTS = ("one_branch", "three_branch", "five_branch", "five_branch_vote", "three_into_five",
            "merge_baselines", "merge_one_branch", "one_into_three", "one_inside_three")

# Stage 2 trains for a shorter budget than stage 1, from already trained branches.
STAGE2_EPOCHS = 100
STAGE2_MILESTONES = (50, 75)


def get_config(arg=None):
  variant, flags = common.parse_arg(arg or "three_into_five", VARIANTS)
  c = common.base_config()
  c.variant = variant
  c.model = "one_resnet"
  # Sources and the surgery of stage 2.
  c.source = ""                 # one checkpoint (expand, vote)
  c.sources = ""                # comma-separated checkpoints (merge)
  c.surgery = ""                # '' | 'expand' | 'merge'
  c.expand_mode = "copy"
  c.expand_from = ""            # copy sources of the new slots, e.g. '0,1' ('' = cycle)
  c.trunk_from = "0"            # merge: source index of the trunk, or 'mean'
  c.symmetry_noise = 0.0        # > 0: perturb the copies (relative to each leaf's std)
  c.symmetry_break = "params"   # ... in their 'params', or only their 'momentum' buffers
  c.reset_optimizer = False     # start the momentum of stage 2 from zero

  branches = {"one_branch": 1, "three_branch": 3, "five_branch": 5, "five_branch_vote": 5,
              "three_into_five": 5, "merge_baselines": 3, "merge_one_branch": 3,
              "one_into_three": 3, "one_inside_three": 3}
  c.num_branches = branches[variant]
  if variant in ("three_into_five", "one_into_three", "one_inside_three"):
    c.surgery = "expand"
  if variant in ("merge_baselines", "merge_one_branch"):
    c.surgery = "merge"
  if variant == "one_into_three":
    c.symmetry_noise = 0.01
  if variant == "three_into_five":
    # Exact copies would stay identical (see one_inside_three): perturbing only the copies'
    # momentum keeps the expanded ensemble equal to the 3-branch one and still lets them part.
    c.symmetry_noise = 0.01
    c.symmetry_break = "momentum"
  if variant == "five_branch_vote":
    c.eval_only = True
    c.vote = True
  if c.surgery:
    c.num_epochs = STAGE2_EPOCHS
    c.milestones = STAGE2_MILESTONES
    c.rampup_epochs = 0          # the branches are trained: distil at full weight at once
  if "smoke" in flags:
    common.apply_smoke(c)
    if c.surgery:
      c.rampup_epochs = 0
  c.deterministic = "deterministic" in flags
  return c
