"""python -m one_jax.convert: PyTorch checkpoints <-> one_jax checkpoints (the command line).

  python -m one_jax.convert IN.pth.tar OUT_DIR            # -> a one_jax checkpoint
  python -m one_jax.convert --allow_pickle IN OUT_DIR     # a trusted file outside the safe list
  python -m one_jax.convert --to_torch CKPT OUT.pth.tar   # -> {'state_dict': ..., 'epoch': ...}
  python -m one_jax.convert --to_torch --branch 0 CKPT OUT.pth  # a ONE ImageNet ResNet's branch 0

The library behind it is one_jax.interop (pytorch.py, the front door).
"""
import logging
import sys

from one_jax import cli
from one_jax.interop import pytorch, reference, torch_files
from one_jax.storage import checkpoints


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
  p.add_argument("--spelling", choices=reference.SPELLINGS, default=None,
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
    out = pytorch.convert_to_torch(args.src, args.dst, module_prefix=prefix, spelling=args.spelling,
                           ignore_gate_offset=args.ignore_gate_offset, branch=args.branch)
  else:
    if args.allow_pickle:
      print(torch_files.ALLOW_PICKLE_WARNING.format(path=args.src), file=sys.stderr, flush=True)
    out = pytorch.convert_to_one_jax(args.src, args.dst, allow_pickle=args.allow_pickle)
  print(out)


def run():
  """Console entry (`one-jax-convert`): main's return value is the exit status."""
  logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's read-only notices
  sys.exit(main())


if __name__ == "__main__":
  run()
