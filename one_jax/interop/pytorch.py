"""PyTorch checkpoints <-> one_jax models and checkpoints: the front door of interop/.

Reads the reference code's .pth.tar files (ONE ResNets with any branch count, and baseline
ResNets), torchvision ResNet state dicts, or bare state dicts, into a ModelSpec and variables,
and writes one_jax variables back under the names they came with: it picks the name set
(reference.py or convert_torchvision.py) from the keys or the model kind, reads files with
torch_files (never running code from them unless asked) and writes checkpoints and .pth.tar
files through the staging of storage/ (complete or absent, never overwriting).

Torch branches are numbered from 1, one_jax branches from 0. `num_batches_tracked` has no
one_jax counterpart: the imported values are kept in the checkpoint metadata so that export
reproduces the original state dict exactly.
"""
import collections
import os
from typing import Any, Dict, Mapping, Optional, Union

import jax
import numpy as np

from one_jax.architectures import model_spec, models
from one_jax.interop import convert_torchvision, reference, torch_common, torch_files
from one_jax.storage import checkpoints, staging, workdirs


def _state_dict_of(obj, source: str):
  """The state dict inside a loaded object: a .pth.tar dict, a bare state dict or a module."""
  import torch  # pylint: disable=g-import-not-at-top
  if isinstance(obj, torch.nn.Module):
    return obj.state_dict()
  if isinstance(obj, Mapping):
    for name in ("state_dict", "model_state_dict"):
      if isinstance(obj.get(name), Mapping):
        return obj[name]
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
      return obj
  kind = (f"a dict with keys {torch_common.list_keys(map(str, obj))}"
          if isinstance(obj, Mapping) else f"a {type(obj).__name__}")
  raise torch_common.ConversionError(f"{source} holds {kind}, not a model checkpoint: expected a "
                                     "dict with 'state_dict' or a state dict of tensors")


def _strip_prefix(state_dict):
  """Removes DataParallel's 'module.' prefix (when every key has it)."""
  keys = list(state_dict)
  if keys and all(k.startswith("module.") for k in keys):
    return {k[len("module."):]: v for k, v in state_dict.items()}, True
  return dict(state_dict), False


def import_state_dict(state_dict, source: str = "state dict") -> torch_common.TorchImport:
  """A reference or torchvision state dict (with or without 'module.') -> TorchImport; strict
  on names and shapes. Floating-point tensors become float32 (the one_jax parameter dtype)."""
  import torch  # pylint: disable=g-import-not-at-top
  sd, prefixed = _strip_prefix(state_dict)
  not_tensors = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
  if not_tensors:
    raise torch_common.ConversionError(
        f"{source}: entries that are not tensors: {torch_common.list_keys(not_tensors)}")
  if convert_torchvision.is_torchvision(sd):
    return convert_torchvision.import_state_dict(sd, source, prefixed)
  return reference.import_state_dict(sd, source, prefixed)


def _jsonable_extras(obj) -> Dict[str, Any]:
  """Scalar top-level fields of a .pth.tar (epoch, acc, best_acc, arch) worth keeping."""
  import torch  # pylint: disable=g-import-not-at-top
  extras = {}
  if not isinstance(obj, Mapping):
    return extras
  for k, v in obj.items():
    if isinstance(v, torch.Tensor) and v.numel() == 1:
      v = v.item()
    if isinstance(v, np.generic):  # numpy scalars of forks (acc = np.float64(...))
      v = v.item()
    if isinstance(v, (bool, int, float, str)) and isinstance(k, str):
      extras[k] = v
  return extras


def read_torch_checkpoint(path: str, *, allow_pickle: bool = False) -> torch_common.TorchImport:
  """Reads a reference .pth.tar or state-dict file, never running code from it by default.

  Tensors, containers and the types of `safe_globals()` are read with torch's weights_only
  loader; anything else is refused (torch_common.ConversionError naming the type). allow_pickle=True
  reads such a file with a full unpickle, which runs whatever code it holds: only for files
  you trust.
  """
  path = os.fspath(path)
  obj = torch_files.read_file(path, allow_pickle)
  state_dict = _state_dict_of(obj, path)
  result = import_state_dict(state_dict, source=path)
  result.extras = {} if state_dict is obj else _jsonable_extras(obj)
  epoch = result.extras.get("epoch", 0)
  result.epoch = int(epoch) if isinstance(epoch, (int, float)) else 0
  return result


def load_torch_checkpoint(path: str, *, allow_pickle: bool = False):
  """(model, variables) of a reference .pth.tar: ONE ResNet (any branch count) or ResNet."""
  result = read_torch_checkpoint(path, allow_pickle=allow_pickle)
  return result.model, result.variables


# Methods whose models the reference names cannot hold (OKDDip's projections and leader, FFL's
# fusion module, PCL's fusion classifier and temporal mean, the B whole networks of DML and
# KDCL); each of their branches exports after `surgery extract`.
NO_REFERENCE_LAYOUT = ("okddip", "ffl", "pcl") + models.INDEPENDENT


def export_torch_state_dict(spec: model_spec.ModelSpec, variables, *, module_prefix: bool = True,
                            spelling: str = "classfier",
                            num_batches_tracked: Union[None, int, Mapping[str, int]] = 0,
                            ignore_gate_offset: bool = False,
                            branch: Optional[int] = None) -> "collections.OrderedDict":
  """variables -> an OrderedDict of torch tensors under the reference names.

  An ImageNet ResNet gets torchvision's names instead (convert_torchvision.export_state_dict:
  the baseline, or `branch` of a ONE model with its trunk; spelling and the gate do not apply).

  num_batches_tracked: an int for every BatchNorm (e.g. the training step count), a mapping
  {key without 'module.': count} as recorded by import (layers it lacks get 0), or None to
  leave the keys out (the layout of PyTorch < 0.4.1 files).
  The reference gate has no log-weight offset: a non-zero 'gate_offset' would change the
  outputs, so it is an error unless ignore_gate_offset.
  """
  if spec.branched and spec.method in NO_REFERENCE_LAYOUT:
    raise ValueError(f"a {spec.method} model ({spec.describe()}) has no layout in the reference "
                     "code's names: extract the branch you want (python -m one_jax.surgery "
                     "extract) and export that network")
  if spec.kind in convert_torchvision.KINDS:
    return convert_torchvision.export_state_dict(spec, variables, branch=branch,
                                                 module_prefix=module_prefix,
                                                 num_batches_tracked=num_batches_tracked)
  if branch is not None:
    raise ValueError(f"branch={branch} applies to ImageNet ResNets (torchvision exports one "
                     f"branch); the {spec.describe()} exports whole under the reference names")
  return reference.export_state_dict(spec, variables, module_prefix=module_prefix,
                                     spelling=spelling, num_batches_tracked=num_batches_tracked,
                                     ignore_gate_offset=ignore_gate_offset)


def convert_to_one_jax(in_path: str, out_dir: str, *, allow_pickle: bool = False) -> str:
  """Writes the one_jax checkpoint of a torch file at OUT_DIR (never overwriting, never inside
  a run or checkpoint directory)."""
  out_dir = staging.resolve(out_dir)
  workdirs.check_destination(out_dir, [in_path], flag="OUT_DIR")
  staging.check_free(out_dir, "OUT_DIR")
  result = read_torch_checkpoint(in_path, allow_pickle=allow_pickle)
  checkpoints.check_finite(result.variables, in_path, "the converted model would compute "
                           "nothing but NaN")
  state = {k: jax.tree.map(np.asarray, v) for k, v in result.variables.items()}
  state["step"] = 0
  meta = {"model": result.spec.to_dict(), "epoch": result.epoch,
          "source": "torch", "source_path": os.path.abspath(in_path), "torch": result.torch_meta()}
  return checkpoints.save_standalone(out_dir, state=state, meta=meta)


def convert_to_torch(ckpt: str, out_path: str, *, module_prefix: Optional[bool] = None,
                     spelling: Optional[str] = None, ignore_gate_offset: bool = False,
                     branch: Optional[int] = None) -> str:
  """Writes {'state_dict', 'epoch'} of a one_jax checkpoint as a .pth.tar (never overwriting).

  Names and num_batches_tracked follow the torch file the checkpoint came from, if any;
  otherwise the reference's ('module.' prefix, 'classfier', the checkpoint's step count), or
  for an ImageNet ResNet torchvision's (no prefix; `branch` of a ONE model).
  """
  import torch  # pylint: disable=g-import-not-at-top
  out_path = workdirs.check_destination(staging.resolve(out_path), [ckpt], flag="OUT.pth.tar")
  staging.check_free(out_path, "OUT.pth.tar")
  state, meta = checkpoints.restore_raw(ckpt)
  spec = checkpoints.spec_of(meta, ckpt)
  checkpoints.check_finite(models.variables_in(state), ckpt,
                           "the exported model would compute nothing but NaN")
  torchvision = spec.kind in convert_torchvision.KINDS
  recorded = meta.get("torch") or {}
  nbt = recorded["num_batches_tracked"] if "num_batches_tracked" in recorded else int(
      np.asarray(state.get("step", 0)))
  state_dict = export_torch_state_dict(
      spec, models.variables_in(state),
      module_prefix=(recorded.get("module_prefix", not torchvision) if module_prefix is None
                     else module_prefix),
      spelling=spelling or recorded.get("spelling", "classfier"),
      num_batches_tracked=nbt, ignore_gate_offset=ignore_gate_offset, branch=branch)
  with staging.staged(out_path, flag="OUT.pth.tar") as tmp:
    torch.save({"state_dict": state_dict, "epoch": int(meta.get("epoch", 0))}, tmp)
  return out_path
