"""The rows of the ONE paper and of the online-distillation papers that compare against it, as
`<arch>_<dataset>` variants: ONE with 3 branches on that architecture.

  python -m one_jax.main --config=configs/paper.py:resnext29_8x64d_cifar100 --workdir=runs/x
  python -m one_jax.main --config=configs/paper.py:vgg16_cifar10,smoke --workdir=runs/s

The single-branch baseline of a row is the same command with --config.model set to the
family's baseline kind (cifar_resnet, wrn, vgg, densenet, resnext). ',smoke' makes a tiny
synthetic run of the same family (a few layers, a few channels); ',deterministic' as in
step1.py.

ONE paper (Lan, Zhu, Gong, NeurIPS 2018), CIFAR-10, CIFAR-100, SVHN: ResNet-32, ResNet-110,
ResNeXt-29 (8x64d) and DenseNet-BC (L=190, k=40), each with the reference's recipe
(configs/common.py: SGD momentum 0.9, weight decay 1e-4, batch 128, 300 epochs, lr 0.1 divided
by 10 at epochs 150 and 225); its reported errors are in its Table 1.

OKDDip (Chen et al., AAAI 2020) and PCL (Wu & Gong, AAAI 2021) re-run ONE on VGG-16 and
DenseNet-40-12 (CIFAR-10, CIFAR-100) with SGD, Nesterov momentum 0.9, weight decay 5e-4,
batch 128, 300 epochs, lr 0.1 divided by 10 at 150 and 225; their tables give the numbers.
Their ResNet-110 is not the ONE code's: 12 bottleneck blocks a stage (1,147,738 parameters at
10 classes), where the ONE code builds 18 (1,704,154): `resnet110_peers_*` rows
(`depth_rule='peers'`, configs/common.py) beside the reference's `resnet110_*`.
Their 'WRN-20-8' is a bottleneck CIFAR ResNet with 2 blocks a stage and 8x wide bottlenecks,
not Zagoruyko's Wide ResNet; here `wrn16_4` and `wrn28_10` are the latter (WRN-d-k: depth
6n+4, pre-activation), with the peers' recipe.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402  (configs/ is loaded by path, not as a package)

# arch -> (ONE kind, depth, options, recipe): 'one' (the reference's) or 'peers' (OKDDip/PCL).
ARCHS = {
    "resnet32": ("one_resnet", 32, {}, "one"),
    "resnet110": ("one_resnet", 110, {}, "one"),
    # The peers' ResNet-110: 12 bottlenecks a stage (the same network as the above at depth 74).
    "resnet110_peers": ("one_resnet", 110, dict(depth_rule="peers"), "peers"),
    "resnext29_8x64d": ("one_resnext", 29, dict(width=4, cardinality=8, group_width=64), "one"),
    "densenet_bc190_40": ("one_densenet", 190, dict(growth_rate=40, bottleneck=True), "one"),
    "vgg16": ("one_vgg", 16, dict(width=64), "peers"),
    "densenet40_12": ("one_densenet", 40, dict(growth_rate=12, bottleneck=False), "peers"),
    "wrn16_4": ("one_wrn", 16, dict(width=4), "peers"),
    "wrn28_10": ("one_wrn", 28, dict(width=10), "peers"),
}
DATASETS = {"one": ("cifar10", "cifar100", "svhn"), "peers": ("cifar10", "cifar100")}
VARIANTS = tuple(f"{arch}_{dataset}" for arch, (_, _, _, recipe) in ARCHS.items()
                 for dataset in DATASETS[recipe])
# The smoke form of each family: the smallest depth, a few channels.
SMOKE = {"one_resnet": (8, {}), "one_wrn": (10, dict(width=1)),
         "one_vgg": (11, dict(width=4)),
         "one_densenet": (10, dict(growth_rate=4)),  # n = 1 (BC, 6n+4) or 2 (3n+4)
         "one_resnext": (11, dict(width=1, cardinality=2, group_width=2))}


def get_config(arg=None):
  variant, flags = common.parse_arg(arg or "resnet32_cifar10", VARIANTS)
  arch = max((a for a in ARCHS if variant.startswith(a + "_")), key=len)  # resnet110_peers
  dataset = variant[len(arch) + 1:]
  kind, depth, options, recipe = ARCHS[arch]
  c = common.base_config()
  c.variant = variant
  c.model, c.depth, c.num_branches = kind, depth, 3
  c.update(options)
  c.dataset, c.num_classes = dataset, common.DATASET_CLASSES[dataset]
  if recipe == "peers":
    c.weight_decay = 5e-4
    c.nesterov = True
  if "smoke" in flags:
    common.apply_smoke(c)
    c.depth, smoke_options = SMOKE[kind]
    c.update(smoke_options)
  c.deterministic = "deterministic" in flags
  return c
