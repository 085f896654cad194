"""ImageNet: torchvision's ResNet-18/34/50, baseline and ONE, with the ONE paper's recipe.

Run (DESIGN.md section 8; the data: README.md, "ImageNet"):

  python -m one_jax.main --config=configs/imagenet.py:resnet18_one --workdir=runs/in_r18_one

Variants: resnet18_baseline, resnet18_one, resnet34_baseline, resnet34_one, resnet50_baseline,
resnet50_one (ONE: 3 branches, each the last stage and fc). The recipe of the ONE paper's
ImageNet rows: 90 epochs, batch 256, SGD lr 0.1 (momentum 0.9, weight decay 1e-4), x0.1 at
epochs 30 and 60; T = 3. The paper reports top-1 error 30.48 (baseline) -> 29.45 (ONE) for
ResNet-18. It gives no KL ramp-up for ImageNet: the CIFAR reference's 80 of 300 epochs is
scaled to 24 of 90.

Multi-host runs: `batch_size` is the global batch over every device of every process, and the
learning rate follows it, lr = 0.1 x batch_size / 256 (Goyal et al., "Accurate, Large
Minibatch SGD"), so `--config.batch_size=1024` trains with lr 0.4; an explicit
`--config.lr=...` overrides the rule. Above ~2k, add `--config.warmup_epochs=5` as they do.
Each process decodes its rows of every batch in `data_workers` grain worker processes.

`,smoke` runs the same code on ImageNet-shaped synthetic images (10 classes, 32x32 crops, a few
steps, ResNet-10 in place of 34 and 50; --config.dataset=imagenet2012 reads TFDS instead),
`,deterministic` as in step1.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402  (configs/ is loaded by path, not as a package)

DEPTHS = (18, 34, 50)
VARIANTS = tuple(f"resnet{d}_{kind}" for d in DEPTHS for kind in ("baseline", "one"))
BASE_LR = 0.1        # at a global batch of BASE_BATCH
BASE_BATCH = 256
# The ONE paper's numbers (top-1 error, %) where it gives them.
PAPER_TOP1_ERROR = {"resnet18_baseline": 30.48, "resnet18_one": 29.45}


def get_config(arg=None):
  variant, flags = common.parse_arg(arg or "resnet18_one", VARIANTS)
  c = common.base_config()
  c.variant = variant
  depth, kind = variant[len("resnet"):].split("_")
  c.depth = int(depth)
  c.model = "imagenet_resnet" if kind == "baseline" else "one_imagenet_resnet"
  c.num_branches = 1 if kind == "baseline" else 3
  c.dataset = "imagenet2012"
  c.num_classes = 1000
  c.image_size = 224              # training crop and evaluation centre crop (resize 256)
  c.data_workers = 8              # grain worker processes per process (JPEG decoding)
  c.num_epochs = 90
  c.milestones = (30, 60)
  c.rampup_epochs = 24.0
  c.batch_size = BASE_BATCH
  c.lr = c.get_ref("batch_size").to_float() * (BASE_LR / BASE_BATCH)
  c.eval_batch_size = 512         # a multiple of any power-of-two device count
  if "smoke" in flags:
    apply_smoke(c)
  c.deterministic = "deterministic" in flags
  return c


def apply_smoke(c) -> None:
  """The same code on ImageNet-shaped synthetic images: 32x32 crops, 10 classes, 2 x 2 steps.
  ResNet-18 keeps its depth; the deeper variants train ResNet-10 (the family's smallest member,
  compiled in a fraction of the time), their full depths being covered by the parameter-count
  and conversion tests."""
  if c.depth > 18:
    c.depth = 10
  c.dataset = "synthetic_imagenet"
  c.num_classes = 10
  c.image_size = 32
  c.data_workers = 0
  c.synthetic_train_size = 64
  c.synthetic_test_size = 24
  c.batch_size = 16
  c.eval_batch_size = 16
  c.num_epochs = 2
  c.steps_per_epoch = 2
  c.milestones = (1,)
  c.rampup_epochs = 1.0
