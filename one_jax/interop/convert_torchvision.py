"""torchvision ResNet state dicts <-> one_jax ImageNet ResNets (the imagenet_resnet family).

The names are torchvision's (`torchvision.models.resnet18().state_dict()`):

  conv1 / bn1                          <-> trunk/conv1, trunk/bn1
  layer{1,2,3}.{i}.*                   <-> trunk/layer{1,2,3}_{i}/*
  layer4.{i}.*, fc                     <-> branch/layer4_{i}/*, branch/classifier
  {..}.downsample.0 / .downsample.1    <-> {..}/downsample_conv / {..}/downsample_bn

with torch_common's leaf layouts (OIHW <-> HWIO, [out, in] <-> [in, out], BatchNorm weight <->
scale, running_mean / running_var <-> batch_stats). A torchvision model is a baseline: import
gives an `imagenet_resnet` checkpoint; a ONE model exports one chosen branch (with the shared
trunk) as a torchvision ResNet, the gate left out, since torchvision has no multi-branch model.
interop/pytorch.py, the front door, reads, checks and writes files of both layouts.
"""
import collections
import re
from typing import List, Mapping, Optional, Union

import jax
import numpy as np

from one_jax.architectures import imagenet_resnet, model_spec
from one_jax.interop import torch_common

BASELINE_KIND = "imagenet_resnet"
KINDS = (BASELINE_KIND, "one_imagenet_resnet")   # the model kinds with torchvision names


def is_torchvision(state_dict) -> bool:
  """Whether the keys are a torchvision ResNet's (a fourth stage and 'fc'), not the CIFAR
  reference's (three stages)."""
  keys = list(state_dict)
  return "fc.weight" in keys and any(k.startswith("layer4.") for k in keys)


def torch_key(path) -> str:
  """torchvision key of a flax leaf path like ('trunk', 'layer1_0', 'conv1', 'kernel')."""
  _, *modules, leaf = path
  names = []
  for module in modules:
    if module == "classifier":
      names.append("fc")
    elif module in torch_common.MODULE_TO_TORCH:
      names.append(torch_common.MODULE_TO_TORCH[module])
    else:
      names.append(re.sub(r"^(layer\d)_(\d+)$", r"\1.\2", module))
  return ".".join(names + [torch_common.LEAF_TO_TORCH[leaf]])


def name_table(spec: model_spec.ModelSpec) -> List[torch_common.Row]:
  """The rows (torch_common.Row) of a baseline, in the order of torchvision's state_dict()."""
  return torch_common.name_table(spec, lambda path, _: torch_key(path))


def infer_spec(state_dict, source: str) -> model_spec.ModelSpec:
  """The imagenet_resnet ModelSpec of torchvision keys: blocks per stage, block type, classes."""
  counts = collections.Counter()
  for key in state_dict:
    m = re.match(r"layer([1-4])\.(\d+)\.", key)
    if m:
      counts[int(m[1])] = max(counts[int(m[1])], int(m[2]) + 1)
  blocks = tuple(counts[i] for i in (1, 2, 3, 4))
  kind = "bottleneck" if any(re.fullmatch(r"layer1\.\d+\.conv3\.weight", k)
                             for k in state_dict) else "basic"
  depths = [d for d, stages in imagenet_resnet.STAGES.items() if stages == (kind, blocks)]
  if not depths:
    known = ", ".join(f"{d} {b} {s}" for d, (b, s) in imagenet_resnet.STAGES.items())
    raise torch_common.ConversionError(
        f"{source}: a torchvision ResNet with {kind} blocks {list(blocks)} per stage is not "
        f"one of the known depths ({known})")
  weight = state_dict["fc.weight"]
  if weight.ndim != 2:
    raise torch_common.ConversionError(f"{source}: fc.weight has shape {tuple(weight.shape)}, not "
                                  "[classes, features]")
  return model_spec.ModelSpec(BASELINE_KIND, depths[0], int(weight.shape[0]))


def import_state_dict(state_dict, source: str, prefixed: bool) -> torch_common.TorchImport:
  """A torchvision ResNet state dict ('module.' already stripped) -> TorchImport of an
  imagenet_resnet baseline; strict on names and shapes."""
  spec = infer_spec(state_dict, source)
  variables, nbt = torch_common.import_tensors(state_dict, spec, name_table(spec), source)
  return torch_common.TorchImport(spec, variables, nbt, "classifier", prefixed)


def branch_variables(spec: model_spec.ModelSpec, variables, branch: Optional[int]):
  """(baseline spec, baseline variables): the model itself, or for a ONE model the trunk and
  branch `branch` (a slice of the stack; the gate is left out)."""
  if not spec.branched:
    if branch not in (None, 0):
      raise ValueError(f"branch={branch} is invalid for a {spec.describe()}: it has one branch")
    return spec, variables
  if branch is None or not 0 <= branch < spec.num_branches:
    raise ValueError(f"the {spec.describe()} exports one branch as a torchvision ResNet: pass "
                     f"--branch=B with B in 0..{spec.num_branches - 1}")
  out = {}
  for col in ("params", "batch_stats"):
    tree = variables[col]
    out[col] = {"trunk": tree["trunk"],
                "branch": jax.tree.map(lambda x: np.asarray(x)[branch], tree["branches"])}
  return spec.with_branches(None), out


def export_state_dict(spec: model_spec.ModelSpec, variables, *, branch: Optional[int] = None,
                      module_prefix: bool = False,
                      num_batches_tracked: Union[None, int, Mapping[str, int]] = 0):
  """variables -> an OrderedDict of torch tensors under torchvision's names (the baseline, or
  branch `branch` of a ONE model with its trunk). num_batches_tracked as in
  torch_common.export_tensors."""
  spec, variables = branch_variables(spec, variables, branch)
  return torch_common.export_tensors(name_table(spec), variables, module_prefix=module_prefix,
                                     num_batches_tracked=num_batches_tracked)
