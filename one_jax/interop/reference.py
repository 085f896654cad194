"""The reference code's PyTorch names (ONE ResNet, CIFAR ResNet) <-> one_jax variables.

The reference code's state dicts (ONE ResNets with any branch count, and baseline ResNets)
become one_jax variables, and one_jax variables go back under the reference names. The mapping is generated from the
flax variable tree, so both directions are the same table:

  conv1 / bn1 / layer{1,2}.{i}.*       <-> trunk/conv1, trunk/bn1, trunk/layer{1,2}_{i}/*
  layer3_{b}.{i}.*, classfier3_{b}     <-> branches/layer3_{i}/*, branches/classifier [b-1]
  layer3.{i}.*, fc (baseline)          <-> branch/layer3_{i}/*, branch/classifier
  control_v1, bn_v1                    <-> gate/dense, gate/bn (absent: a CL-ILR model, as
                                           the OKDDip code's CL ResNet, resnet_one.py avg=True)
  {..}.downsample.0 / .downsample.1    <-> {..}/downsample_conv / {..}/downsample_bn
  weight (conv OIHW, linear [out, in]) <-> kernel (HWIO, [in, out]); BN weight <-> scale;
  running_mean / running_var           <-> batch_stats mean / var

The names depend only on the blocks a stage, so a model of either depth rule (cifar_resnet.py)
exports; a file's blocks give its depth under the reference's rule (6n+2), or under the peers'
(9n+2) for the 5 or 6 Bottlenecks a stage no 6n+2 depth builds. So the peers' ResNet-110 (12
Bottlenecks a stage) comes back as the same network at depth 74.

Torch branches are numbered from 1, one_jax branches from 0. `num_batches_tracked` has no
one_jax counterpart: the imported values are kept in the checkpoint metadata so that export
reproduces the original state dict exactly.
"""
import re
from typing import List, Mapping, Optional, Union

import jax
import numpy as np

from one_jax.architectures import cifar_resnet, model_spec
from one_jax.interop import torch_common

SPELLINGS = ("classfier", "classifier")  # the reference's spelling, and later forks'
_GATE_TO_TORCH = {"dense": "control_v1", "bn": "bn_v1"}


# ----------------------------------------------------------------------------- the name table


def _module_name(top: str, module: str, branch: Optional[int], spelling: str) -> str:
  """Torch name of one flax module on the path (branch: 0-based slot of 'branches')."""
  stage = re.fullmatch(r"layer(\d)_(\d+)", module)
  if stage:
    if top == "branches":
      return f"layer{stage[1]}_{branch + 1}.{stage[2]}"
    return f"layer{stage[1]}.{stage[2]}"
  if module == "classifier":
    return f"{spelling}3_{branch + 1}" if top == "branches" else "fc"
  if top == "gate":
    return _GATE_TO_TORCH[module]
  return torch_common.MODULE_TO_TORCH.get(module, module)


def torch_key(path, branch: Optional[int] = None, spelling: str = "classfier") -> str:
  """Reference state-dict key (no 'module.' prefix) of a flax leaf path like
  ('trunk', 'layer1_0', 'conv1', 'kernel'); `branch` picks the slot of a 'branches' leaf."""
  top, *modules, leaf = path
  names = [_module_name(top, m, branch, spelling) for m in modules]
  return ".".join(names + [torch_common.LEAF_TO_TORCH[leaf]])


def name_table(spec: model_spec.ModelSpec, spelling: str = "classfier") -> List[torch_common.Row]:
  """The rows (torch_common.Row) of a CIFAR ResNet or ONE ResNet, in the reference's order."""
  if spelling not in SPELLINGS:
    raise ValueError(f"spelling={spelling!r} is unknown: use one of {', '.join(SPELLINGS)}")
  if model_spec.architecture(spec.kind).family != "cifar_resnet":
    raise torch_common.ConversionError(f"a {spec.describe()} has no PyTorch counterpart here: conversion "
                          "covers the reference's CIFAR ResNet (one_resnet, cifar_resnet) and "
                          "torchvision's ImageNet ResNets (imagenet_resnet, one_imagenet_resnet)")
  return torch_common.name_table(spec, lambda path, b: torch_key(path, b, spelling))


def infer_model(state_dict, source: str):
  """(ModelSpec, spelling) from the key names: blocks per stage, block type, branches, classes."""
  keys = list(state_dict)
  blocks = {int(m[1]) for k in keys for m in [re.match(r"layer1\.(\d+)\.", k)] if m}
  if not blocks:
    raise torch_common.ConversionError(f"{source}: no 'layer1.<i>.' keys, so this is not a CIFAR ResNet or "
                          f"ONE ResNet checkpoint (keys: {torch_common.list_keys(keys)})")
  n = max(blocks) + 1
  depth, rule = 6 * n + 2, "one"
  bottleneck = any(re.fullmatch(r"layer1\.\d+\.conv3\.weight", k) for k in keys)
  if bottleneck and depth < 44 <= 9 * n + 2:
    # No 6n+2 depth builds so few Bottlenecks; the peers' rule does (cifar_resnet).
    depth, rule = 9 * n + 2, "peers"
  if bottleneck != (cifar_resnet.block_type(depth) == "bottleneck"):
    have, want = ("Bottleneck", "BasicBlock") if bottleneck else ("BasicBlock", "Bottleneck")
    raise torch_common.ConversionError(f"{source}: {n} blocks per stage (depth {depth}) built from {have} "
                          f"blocks, but the reference uses {want} at depth {depth} "
                          "(Bottleneck from depth 44 on)")
  branches = {int(m[1]) for k in keys
              for m in [re.match(r"(?:layer3|classfier3|classifier3)_(\d+)\.", k)] if m}
  is_one = bool(branches) or any(k.startswith(("control_v1.", "bn_v1.")) for k in keys)
  spelling = "classifier" if any(k.startswith("classifier3_") for k in keys) and not any(
      k.startswith("classfier3_") for k in keys) else "classfier"
  classifier = f"{spelling}3_1.weight" if is_one else "fc.weight"
  weight = state_dict.get(classifier)
  if weight is None or weight.ndim != 2:
    raise torch_common.ConversionError(f"{source}: missing keys [{classifier}] (the class count is read "
                          "from it)")
  num_classes = int(weight.shape[0])
  if not is_one:
    return model_spec.ModelSpec("cifar_resnet", depth, num_classes, depth_rule=rule), spelling
  # Branches without ONE's gate: the OKDDip code's CL model (resnet_one.py with avg=True).
  gated = any(k.startswith(("control_v1.", "bn_v1.")) for k in keys)
  return model_spec.ModelSpec("one_resnet", depth, num_classes, max(branches), depth_rule=rule,
                              method="one" if gated else "cl_ilr"), spelling


def import_state_dict(state_dict, source: str, prefixed: bool) -> torch_common.TorchImport:
  """A reference state dict ('module.' already stripped) -> TorchImport; strict on names and
  shapes."""
  spec, spelling = infer_model(state_dict, source)
  variables, nbt = torch_common.import_tensors(state_dict, spec, name_table(spec, spelling),
                                               source)
  return torch_common.TorchImport(spec, variables, nbt, spelling, prefixed)


def export_state_dict(spec: model_spec.ModelSpec, variables, *, module_prefix: bool = True,
                      spelling: str = "classfier",
                      num_batches_tracked: Union[None, int, Mapping[str, int]] = 0,
                      ignore_gate_offset: bool = False):
  """variables -> an OrderedDict of torch tensors under the reference names.

  num_batches_tracked as in torch_common.export_tensors. The reference gate has no log-weight
  offset: a non-zero 'gate_offset' would change the outputs, so it is an error unless
  ignore_gate_offset.
  """
  offsets = jax.tree.leaves(variables.get("gate_offset", {}))
  if not ignore_gate_offset and any(np.any(np.asarray(o) != 0) for o in offsets):
    raise ValueError("the gate has a non-zero log-weight offset (from surgery), which the "
                     "reference ONE model cannot express: add --ignore_gate_offset to drop it "
                     "(ignore_gate_offset=True in the library)")
  return torch_common.export_tensors(name_table(spec, spelling), variables,
                                     module_prefix=module_prefix,
                                     num_batches_tracked=num_batches_tracked)
