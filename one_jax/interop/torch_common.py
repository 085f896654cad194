"""What both sets of PyTorch names share (the reference's CIFAR ResNets in one_jax.convert,
torchvision's ImageNet ResNets in one_jax.interop.convert_torchvision): the conversion's error and
result types, the leaf names and layouts (OIHW <-> HWIO, [out, in] <-> [in, out], BatchNorm
weight <-> scale, running statistics <-> batch_stats), the modules' registration order and the
key listing of error messages. A leaf below both converters."""
import dataclasses
import re
from typing import Any, Dict, Optional

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
