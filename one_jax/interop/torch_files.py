"""Reading PyTorch files without running code from them.

torch.load with weights_only=True and a short safe list of the non-tensor types that forks of
the reference scripts store (safe_globals); a file holding anything else is refused with one
line naming the type, and read with a full unpickle only when the user asks (allow_pickle).
"""
import os

import numpy as np

from one_jax import cli
from one_jax.interop import torch_common


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


def read_file(path: str, allow_pickle: bool):
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
