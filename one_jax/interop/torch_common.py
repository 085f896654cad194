"""What both sets of PyTorch names share (the reference's CIFAR ResNets in interop/reference.py,
torchvision's ImageNet ResNets in interop/convert_torchvision.py): the conversion's error and
result types, the leaf names and layouts (OIHW <-> HWIO, [out, in] <-> [in, out], BatchNorm
weight <-> scale, running statistics <-> batch_stats), the modules' registration order, and
the one skeleton of both converters: a name table generated from the flax variable tree
(name_table), read strictly (import_tensors) and written back (export_tensors). Each set of
names is then only its torch_key function and how a file's keys give its model."""
import collections
import dataclasses
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from one_jax.architectures import model_spec

NBT = "num_batches_tracked"
_MAX_LISTED = 20

LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias",
                 "mean": "running_mean", "var": "running_var"}
MODULE_TO_TORCH = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}


class ConversionError(ValueError):
  """A torch checkpoint cannot be converted (the message names the file and the cause)."""


@dataclasses.dataclass
class TorchImport:
  """Everything read from a torch checkpoint: the model, its variables, and what export needs."""
  spec: model_spec.ModelSpec
  variables: Dict[str, Any]
  num_batches_tracked: Optional[Dict[str, int]]  # None: the file had none (PyTorch < 0.4.1)
  spelling: str
  module_prefix: bool
  epoch: int = 0
  extras: Dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def model(self):
    """The Flax module of `spec`."""
    return self.spec.build()

  def torch_meta(self) -> Dict[str, Any]:
    """The JSON-able part that export_torch_state_dict needs to reproduce the file."""
    return {"num_batches_tracked": self.num_batches_tracked, "spelling": self.spelling,
            "module_prefix": self.module_prefix, "extras": self.extras}


def list_keys(keys):
  keys = sorted(keys)
  more = f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
  return "[" + ", ".join(keys[:_MAX_LISTED]) + more + "]"


TORCH_ORDER = {name: i for i, name in enumerate(
    ["conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample", "layer1", "layer2", "layer3",
     "layer4",
     "control_v1", "bn_v1", "classfier3", "classifier3", "fc", "weight", "bias", "running_mean",
     "running_var", NBT])}


def torch_order(key: str):
  """Sort key giving the reference modules' registration order (that of their state_dict())."""
  ranks = []
  for part in key.split("."):
    base, _, branch = part.rpartition("_") if re.fullmatch(r"\w+3_\d+", part) else (part, "", "")
    ranks.append((int(part), 0) if part.isdigit() else (TORCH_ORDER[base], int(branch or 0)))
  return ranks


def to_torch_layout(x: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel":
    return np.transpose(x, (3, 2, 0, 1)) if x.ndim == 4 else x.T  # HWIO -> OIHW; [in,out] -> [out,in]
  return x


def from_torch_layout(x: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel":
    return np.transpose(x, (2, 3, 1, 0)) if x.ndim == 4 else x.T
  return x


def as_numpy(tensor):
  import torch  # pylint: disable=g-import-not-at-top
  return tensor.detach().cpu().to(torch.float32).numpy()


# A name-table row: (torch key, (collection, *flax path), branch slot or None, flax leaf shape).
Row = Tuple[str, Tuple[str, ...], Optional[int], Tuple[int, ...]]


def name_table(spec: model_spec.ModelSpec,
               torch_key: Callable[[Tuple[str, ...], Optional[int]], str]) -> List[Row]:
  """Every leaf of the model's params and batch_stats with its torch key, in the order of
  torch's state_dict(). torch_key(flax path, slot) names a leaf; a leaf under 'branches' gets
  one row per branch slot (its torch modules are per branch)."""
  shapes = spec.abstract_variables()
  table = []
  for col in ("params", "batch_stats"):
    for path, leaf in flax.traverse_util.flatten_dict(shapes.get(col, {})).items():
      slots = range(leaf.shape[0]) if path[0] == "branches" else [None]
      for b in slots:
        table.append((torch_key(path, b), (col,) + path, b, leaf.shape))
  return sorted(table, key=lambda row: torch_order(row[0]))


def _nbt_keys(table: List[Row]):
  """The num_batches_tracked key of every BatchNorm module (those with a running_mean)."""
  return {k[:-len("running_mean")] + NBT for k, *_ in table if k.endswith(".running_mean")}


def import_tensors(state_dict, spec: model_spec.ModelSpec, table: List[Row], source: str):
  """(variables, num_batches_tracked or None) of a state dict ('module.' stripped) that must
  hold exactly the table's keys (num_batches_tracked optional), with shapes that fit `spec`.
  Branch slots are stacked on axis 0; a gate offset starts at zero (torch has none)."""
  nbt_keys = _nbt_keys(table)
  expected = {k for k, *_ in table}
  missing = expected - set(state_dict)
  unknown = set(state_dict) - expected - nbt_keys
  if missing or unknown:
    parts = ([f"missing keys {list_keys(missing)}"] if missing else []) + (
        [f"unknown keys {list_keys(unknown)}"] if unknown else [])
    raise ConversionError(f"{source}: does not match the {spec.describe()} its keys imply: "
                          + "; ".join(parts))
  flat, bad_shapes = {}, []
  for key, path, b, shape in table:
    x = from_torch_layout(as_numpy(state_dict[key]), path[-1])
    want = shape[1:] if b is not None else shape
    if x.shape != tuple(want):
      bad_shapes.append(f"{key} {tuple(state_dict[key].shape)}")
      continue
    flat.setdefault(path, []).append(x)
  if bad_shapes:
    raise ConversionError(f"{source}: tensors with shapes that do not fit the "
                          f"{spec.describe()}: {list_keys(bad_shapes)}")
  flat = {p: (np.stack(xs) if p[1] == "branches" else xs[0]) for p, xs in flat.items()}
  variables = flax.traverse_util.unflatten_dict(flat)
  shapes = spec.abstract_variables()
  if "gate_offset" in shapes:
    variables["gate_offset"] = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                                            shapes["gate_offset"])
  present = sorted(k for k in nbt_keys if k in state_dict)
  nbt = {k: int(state_dict[k].item()) for k in present} if present else None
  return jax.tree.map(jnp.asarray, variables), nbt


def export_tensors(table: List[Row], variables, *, module_prefix: bool,
                   num_batches_tracked: Union[None, int, Mapping[str, int]]
                   ) -> "collections.OrderedDict":
  """The torch state dict of `variables` under the table's names (a slot of a 'branches' leaf
  for its row). num_batches_tracked: an int for every BatchNorm, a mapping {key without
  'module.': count} (layers it lacks get 0), or None to leave the keys out."""
  import torch  # pylint: disable=g-import-not-at-top
  flat = flax.traverse_util.flatten_dict(
      {c: variables[c] for c in ("params", "batch_stats") if c in variables})
  prefix = "module." if module_prefix else ""
  out = collections.OrderedDict()
  for key, path, b, _ in table:
    x = np.asarray(flat[path])
    x = to_torch_layout(x[b] if b is not None else x, path[-1])
    out[prefix + key] = torch.from_numpy(np.array(x))  # a writable copy
    if key.endswith(".running_var") and num_batches_tracked is not None:
      nbt_key = key[:-len("running_var")] + NBT
      count = (num_batches_tracked.get(nbt_key, 0) if isinstance(num_batches_tracked, Mapping)
               else num_batches_tracked)
      out[prefix + nbt_key] = torch.tensor(int(count), dtype=torch.long)
  return out
