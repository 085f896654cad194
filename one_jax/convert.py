"""PyTorch reference checkpoints <-> one_jax models and checkpoints.

Reads the reference code's .pth.tar files (ONE ResNets with any branch count, and baseline
ResNets), or bare state dicts, into (model, variables) with the layout of one_jax.architectures.models, and
writes one_jax variables back under the reference names. The mapping is generated from the
flax variable tree, so both directions are the same table:

  conv1 / bn1 / layer{1,2}.{i}.*       <-> trunk/conv1, trunk/bn1, trunk/layer{1,2}_{i}/*
  layer3_{b}.{i}.*, classfier3_{b}     <-> branches/layer3_{i}/*, branches/classifier [b-1]
  layer3.{i}.*, fc (baseline)          <-> branch/layer3_{i}/*, branch/classifier
  control_v1, bn_v1                    <-> gate/dense, gate/bn
  {..}.downsample.0 / .downsample.1    <-> {..}/downsample_conv / {..}/downsample_bn
  weight (conv OIHW, linear [out, in]) <-> kernel (HWIO, [in, out]); BN weight <-> scale;
  running_mean / running_var           <-> batch_stats mean / var

torchvision's ImageNet ResNets (imagenet_resnet, one_imagenet_resnet) have their own name table
in one_jax.interop.convert_torchvision; the functions and the command line below take either layout.

Torch branches are numbered from 1, one_jax branches from 0. `num_batches_tracked` has no
one_jax counterpart: the imported values are kept in the checkpoint metadata so that export
reproduces the original state dict exactly.

Command line:
  python -m one_jax.convert IN.pth.tar OUT_DIR            # -> a one_jax checkpoint
  python -m one_jax.convert --allow_pickle IN OUT_DIR     # a trusted file outside the safe list
  python -m one_jax.convert --to_torch CKPT OUT.pth.tar   # -> {'state_dict': ..., 'epoch': ...}
  python -m one_jax.convert --to_torch --branch 0 CKPT OUT.pth  # a ONE ImageNet ResNet's branch 0
"""
import collections
import logging
import os
import re
import sys
from typing import Any, Dict, Mapping, Optional, Union

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from one_jax import cli
from one_jax.architectures import cifar_resnet, model_spec, models
from one_jax.interop import convert_torchvision, torch_common
from one_jax.storage import checkpoints, staging, workdirs

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


def name_table(spec: model_spec.ModelSpec, spelling: str = "classfier"):
  """[(torch key, (collection, *flax path), branch slot or None, flax leaf shape)] in order."""
  if spelling not in SPELLINGS:
    raise ValueError(f"spelling={spelling!r} is unknown: use one of {', '.join(SPELLINGS)}")
  if model_spec.architecture(spec.kind).family != "cifar_resnet":
    raise torch_common.ConversionError(f"a {spec.describe()} has no PyTorch counterpart here: conversion "
                          "covers the reference's CIFAR ResNet (one_resnet, cifar_resnet) and "
                          "torchvision's ImageNet ResNets (imagenet_resnet, one_imagenet_resnet)")
  shapes = spec.abstract_variables()
  table = []
  for col in ("params", "batch_stats"):
    for path, leaf in flax.traverse_util.flatten_dict(shapes.get(col, {})).items():
      slots = range(leaf.shape[0]) if path[0] == "branches" else [None]
      for b in slots:
        table.append((torch_key(path, b, spelling), (col,) + path, b, leaf.shape))
  return sorted(table, key=lambda row: torch_common.torch_order(row[0]))


def _bn_modules(table):
  """Torch names of the BatchNorm modules (those with a running_mean)."""
  return [k[:-len(".running_mean")] for k, *_ in table if k.endswith(".running_mean")]


# ----------------------------------------------------------------------------- torch -> one_jax


def safe_globals():
  """The non-tensor types that forks of the reference scripts store beside the state dict
  (argparse.Namespace of the command line, numpy scalars, dtypes and arrays of accuracies).

  None of them runs code when unpickled: they are read with torch's weights_only loader, as
  a context (torch.serialization.safe_globals), never added to torch's global list.
  """
  import argparse  # pylint: disable=g-import-not-at-top
  multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # pylint: disable=protected-access
  allowed = [argparse.Namespace, np.ndarray, np.dtype, multiarray.scalar, multiarray._reconstruct,  # pylint: disable=protected-access
             # files written under numpy 1.x name the same functions by their old module
             (multiarray.scalar, "numpy.core.multiarray.scalar"),
             (multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]  # pylint: disable=protected-access
  allowed += [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")
              and name not in ("ObjectDType", "VoidDType", "StringDType")]
  return allowed


ALLOW_PICKLE_WARNING = ("warning: --allow_pickle: {path} is read with a full unpickle, which runs "
                        "any code the file holds; use it only for files you trust")


def _unsafe_types(path: str) -> list:
  """Names of the globals in PATH's pickle outside torch's and our safe list (not executed)."""
  import torch  # pylint: disable=g-import-not-at-top
  try:
    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
  except Exception:  # pylint: disable=broad-except  (not a zip checkpoint: no names to give)
    return []
  allowed = set()
  for entry in safe_globals():
    if isinstance(entry, tuple):
      allowed.add(entry[1])
    else:
      allowed.add(f"{entry.__module__}.{entry.__qualname__}")
  return [n for n in names if n not in allowed]


def _read_file(path: str, allow_pickle: bool):
  """torch.load with weights_only=True and the safe list; a full unpickle only when allowed."""
  import pickle  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise torch_common.ConversionError(f"{path} does not exist: pass a PyTorch .pth.tar or state-dict file")
  if os.path.isdir(path):
    raise torch_common.ConversionError(f"{path} is a directory: pass a PyTorch .pth.tar or state-dict file "
                          "(one_jax checkpoints go to torch with --to_torch)")
  if allow_pickle:
    try:
      return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # pylint: disable=broad-except
      raise torch_common.ConversionError(f"cannot read {path}: not a PyTorch checkpoint "
                            f"({cli.first_line(e)})") from e
  try:
    with torch.serialization.safe_globals(safe_globals()):
      return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    unsafe = _unsafe_types(path)
    if unsafe or "GLOBAL" in str(e):
      named = ", ".join(unsafe) or cli.first_line(e).split("GLOBAL ")[-1].split(" ")[0]
      raise torch_common.ConversionError(
          f"{path} holds objects of type {named}, which is not on the safe list (tensors, "
          "containers, argparse.Namespace, numpy scalars and arrays): loading it would run code "
          "from the file; if you trust the file, pass --allow_pickle (library: "
          "allow_pickle=True)") from None
    raise torch_common.ConversionError(f"cannot read {path}: not a PyTorch checkpoint "
                          f"({cli.first_line(e)})") from None
  except Exception as e:  # pylint: disable=broad-except
    raise torch_common.ConversionError(f"cannot read {path}: not a PyTorch checkpoint "
                          f"({cli.first_line(e)})") from None


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
  kind = f"a dict with keys {torch_common.list_keys(map(str, obj))}" if isinstance(obj, Mapping) else (
      f"a {type(obj).__name__}")
  raise torch_common.ConversionError(f"{source} holds {kind}, not a model checkpoint: expected a dict with "
                        "'state_dict' or a state dict of tensors")


def _strip_prefix(state_dict):
  """Removes DataParallel's 'module.' prefix (when every key has it)."""
  keys = list(state_dict)
  if keys and all(k.startswith("module.") for k in keys):
    return {k[len("module."):]: v for k, v in state_dict.items()}, True
  return dict(state_dict), False


def _infer_model(state_dict, source: str):
  """(ModelSpec, spelling) from the key names: blocks per stage, block type, branches, classes."""
  keys = list(state_dict)
  blocks = {int(m[1]) for k in keys for m in [re.match(r"layer1\.(\d+)\.", k)] if m}
  if not blocks:
    raise torch_common.ConversionError(f"{source}: no 'layer1.<i>.' keys, so this is not a CIFAR ResNet or "
                          f"ONE ResNet checkpoint (keys: {torch_common.list_keys(keys)})")
  n = max(blocks) + 1
  depth = 6 * n + 2
  bottleneck = any(re.fullmatch(r"layer1\.\d+\.conv3\.weight", k) for k in keys)
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
    return model_spec.ModelSpec("cifar_resnet", depth, num_classes), spelling
  return model_spec.ModelSpec("one_resnet", depth, num_classes, max(branches)), spelling


def import_state_dict(state_dict, source: str = "state dict") -> torch_common.TorchImport:
  """A reference state dict (with or without 'module.') -> torch_common.TorchImport; strict on names/shapes.

  Floating-point tensors become float32 (the one_jax parameter dtype).
  """
  import torch  # pylint: disable=g-import-not-at-top
  sd, prefixed = _strip_prefix(state_dict)
  not_tensors = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
  if not_tensors:
    raise torch_common.ConversionError(f"{source}: entries that are not tensors: {torch_common.list_keys(not_tensors)}")
  if convert_torchvision.is_torchvision(sd):
    return convert_torchvision.import_state_dict(sd, source, prefixed)
  spec, spelling = _infer_model(sd, source)
  table = name_table(spec, spelling)
  nbt_keys = {f"{m}.{torch_common.NBT}" for m in _bn_modules(table)}
  expected = {k for k, *_ in table}
  missing = expected - set(sd)
  unknown = set(sd) - expected - nbt_keys
  if missing or unknown:
    parts = ([f"missing keys {torch_common.list_keys(missing)}"] if missing else []) + (
        [f"unknown keys {torch_common.list_keys(unknown)}"] if unknown else [])
    raise torch_common.ConversionError(f"{source}: does not match the {spec.describe()} its keys imply: "
                          + "; ".join(parts))
  flat, bad_shapes = {}, []
  for key, path, b, shape in table:
    x = torch_common.from_torch_layout(torch_common.as_numpy(sd[key]), path[-1])
    want = shape[1:] if b is not None else shape
    if x.shape != tuple(want):
      bad_shapes.append(f"{key} {tuple(sd[key].shape)}")
      continue
    flat.setdefault(path, []).append(x)
  if bad_shapes:
    raise torch_common.ConversionError(f"{source}: tensors with shapes that do not fit the {spec.describe()}: "
                          f"{torch_common.list_keys(bad_shapes)}")
  flat = {p: (np.stack(xs) if p[1] == "branches" else xs[0]) for p, xs in flat.items()}
  variables = flax.traverse_util.unflatten_dict(flat)
  shapes = spec.abstract_variables()
  if "gate_offset" in shapes:  # zeros: the reference gate has no offset
    variables["gate_offset"] = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                                            shapes["gate_offset"])
  present = sorted(k for k in nbt_keys if k in sd)
  nbt = {k: int(sd[k].item()) for k in present} if present else None
  variables = jax.tree.map(jnp.asarray, variables)
  return torch_common.TorchImport(spec, variables, nbt, spelling, prefixed)


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
  obj = _read_file(path, allow_pickle)
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


# ----------------------------------------------------------------------------- one_jax -> torch


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
  import torch  # pylint: disable=g-import-not-at-top
  if spec.kind in convert_torchvision.KINDS:
    return convert_torchvision.export_state_dict(spec, variables, branch=branch,
                                                 module_prefix=module_prefix,
                                                 num_batches_tracked=num_batches_tracked)
  if branch is not None:
    raise ValueError(f"branch={branch} applies to ImageNet ResNets (torchvision exports one "
                     f"branch); the {spec.describe()} exports whole under the reference names")
  offsets = jax.tree.leaves(variables.get("gate_offset", {}))
  if not ignore_gate_offset and any(np.any(np.asarray(o) != 0) for o in offsets):
    raise ValueError("the gate has a non-zero log-weight offset (from surgery), which the "
                     "reference ONE model cannot express: add --ignore_gate_offset to drop it "
                     "(ignore_gate_offset=True in the library)")
  table = name_table(spec, spelling)
  flat = flax.traverse_util.flatten_dict(
      {c: variables[c] for c in ("params", "batch_stats") if c in variables})
  prefix = "module." if module_prefix else ""
  out = collections.OrderedDict()
  for key, path, b, _ in table:
    x = np.asarray(flat[path])
    x = torch_common.to_torch_layout(x[b] if b is not None else x, path[-1])
    out[prefix + key] = torch.from_numpy(np.array(x))  # a writable copy
    if key.endswith(".running_var") and num_batches_tracked is not None:
      nbt_key = key[:-len("running_var")] + torch_common.NBT
      count = (num_batches_tracked.get(nbt_key, 0) if isinstance(num_batches_tracked, Mapping)
               else num_batches_tracked)
      out[prefix + nbt_key] = torch.tensor(int(count), dtype=torch.long)
  return out


# ----------------------------------------------------------------------------- files


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


def _parser():
  p = cli.ArgumentParser(
      prog="python -m one_jax.convert",
      description="Convert reference PyTorch ONE/ResNet checkpoints to one_jax checkpoints, "
                  "or back with --to_torch.")
  p.add_argument("src", help="IN.pth.tar (or with --to_torch: a one_jax checkpoint)")
  p.add_argument("dst", help="OUT_DIR, a new directory (or with --to_torch: a new OUT.pth.tar)")
  p.add_argument("--to_torch", action="store_true", help="one_jax checkpoint -> .pth.tar")
  p.add_argument("--allow_pickle", action="store_true",
                 help="read a file holding types outside the safe list with a full unpickle, "
                      "which runs any code the file holds (only for files you trust)")
  p.add_argument("--spelling", choices=SPELLINGS, default=None,
                 help="--to_torch: classifier key names (default: as imported, else 'classfier')")
  p.add_argument("--module_prefix", choices=("yes", "no"), default=None,
                 help="--to_torch: 'module.' key prefix (default: as imported, else yes)")
  p.add_argument("--ignore_gate_offset", action="store_true",
                 help="--to_torch: drop a non-zero gate offset instead of failing")
  p.add_argument("--branch", type=int, default=None,
                 help="--to_torch of a ONE ImageNet ResNet: the 0-based branch written, with "
                      "the trunk, as a torchvision ResNet")
  return p


def main(argv=None) -> int:
  checkpoints.quiet_orbax_noise()
  return cli.exit_status(_run, argv)


def _run(argv) -> None:
  args = _parser().parse_args(argv)
  if args.to_torch:
    prefix = None if args.module_prefix is None else args.module_prefix == "yes"
    out = convert_to_torch(args.src, args.dst, module_prefix=prefix, spelling=args.spelling,
                           ignore_gate_offset=args.ignore_gate_offset, branch=args.branch)
  else:
    if args.allow_pickle:
      print(ALLOW_PICKLE_WARNING.format(path=args.src), file=sys.stderr, flush=True)
    out = convert_to_one_jax(args.src, args.dst, allow_pickle=args.allow_pickle)
  print(out)


def run():
  """Console entry (`one-jax-convert`): main's return value is the exit status."""
  logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's read-only notices
  sys.exit(main())


if __name__ == "__main__":
  run()
