"""python -m one_jax.surgery: the command line of one_jax.surgery's operations.

  python -m one_jax.surgery expand --src=CKPT --dst=OUT --branches=N [--mode=copy|fresh] ...
  python -m one_jax.surgery merge | transplant | extract | inspect ...

(the package's docstring gives every option). Errors print one line `error: ...` on stderr and
exit with status 1, having written nothing.
"""
import argparse
import sys
from typing import List, Optional, Sequence

from one_jax import cli, surgery, validate
from one_jax.storage import checkpoints
from one_jax.surgery import operations


def _int_list(text: str) -> List[int]:
  try:
    return [int(x) for x in validate.comma_list(text)]
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of branch indices")


def _trunk_from(text: str):
  try:
    return operations.parse_trunk_from(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def _parser() -> argparse.ArgumentParser:
  parser = cli.ArgumentParser(prog="python -m one_jax.surgery",
                   description="Grow, merge, transplant and extract branches of one_jax checkpoints.")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  p = sub.add_parser("expand", help="m -> N branches (copies keep the ensemble output unchanged)")
  p.add_argument("--src", required=True)
  p.add_argument("--dst", required=True)
  p.add_argument("--branches", required=True, type=int)
  p.add_argument("--mode", default="copy", choices=("copy", "fresh"))
  p.add_argument("--from", dest="sources", type=_int_list, default=None,
                 help="copy mode: the branch each new slot copies (default 0,1,2,... cycling)")
  p.add_argument("--seed", type=int, default=0, help="seed of fresh initialisations")
  p.add_argument("--fresh_gate", default="zero", choices=surgery.FRESH_GATES,
                 help="gate columns of fresh slots: zero (no gradient) or init (random)")
  p.add_argument("--reset_optimizer", action="store_true")
  p = sub.add_parser("merge", help="k models -> one model with a slot per source branch")
  p.add_argument("--src", required=True, action="append")
  p.add_argument("--dst", required=True)
  p.add_argument("--trunk_from", type=_trunk_from, default=0)
  p.add_argument("--slots", type=_int_list, default=None,
                 help="output slot of each source branch, in source order (default: in order)")
  p.add_argument("--fresh_gate", default="zero", choices=surgery.FRESH_GATES,
                 help="gate columns of baseline sources: zero (no gradient) or init (random)")
  p.add_argument("--seed", type=int, default=0,
                 help="seed of fresh gate columns (init) and of an OKDDip group's projections")
  p.add_argument("--method", default=None,
                 help="the merged model's method (default: the sources', ONE for baselines): "
                      "e.g. cl_ilr to merge baselines into a CL-ILR model, okddip into an "
                      "OKDDip group (the last source its leader)")
  p.add_argument("--reset_optimizer", action="store_true")
  p = sub.add_parser("transplant", help="branch I of X into slot J of Y")
  p.add_argument("--src", required=True)
  p.add_argument("--branch", required=True, type=int)
  p.add_argument("--into", required=True)
  p.add_argument("--slot", required=True, type=int)
  p.add_argument("--dst", required=True)
  p.add_argument("--reset_optimizer", action="store_true")
  p = sub.add_parser("extract", help="branch I + trunk -> a baseline checkpoint")
  p.add_argument("--src", required=True)
  p.add_argument("--branch", required=True, type=int)
  p.add_argument("--dst", required=True)
  p.add_argument("--reset_optimizer", action="store_true")
  p.add_argument("--weights", default="deployed", choices=operations.EXTRACT_WEIGHTS,
                 help="a PCL model's network: its temporal mean's or the live model's "
                      "(deployed: the temporal mean for PCL, the live model otherwise)")
  p = sub.add_parser("inspect", help="print a checkpoint's model, step, parameter counts")
  p.add_argument("checkpoint")
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs one command; on failure prints one line `error: ...` on stderr and returns 1."""
  from absl import logging as absl_logging  # Orbax logs warnings on every read-only restore
  absl_logging.set_verbosity(absl_logging.ERROR)
  checkpoints.quiet_orbax_noise()
  return cli.exit_status(_run, argv)


def _run(argv) -> None:
  args = _parser().parse_args(argv)
  if args.command == "expand":
    out = surgery.run_expand(args.src, args.dst, args.branches, mode=args.mode, sources=args.sources,
                             seed=args.seed, fresh_gate=args.fresh_gate,
                     reset_optimizer=args.reset_optimizer)
  elif args.command == "merge":
    out = surgery.run_merge(args.src, args.dst, slots=args.slots, trunk_from=args.trunk_from,
                            fresh_gate=args.fresh_gate, seed=args.seed,
                            reset_optimizer=args.reset_optimizer, method=args.method)
  elif args.command == "transplant":
    out = surgery.run_transplant(args.src, args.branch, args.into, args.slot, args.dst,
                                 reset_optimizer=args.reset_optimizer)
  elif args.command == "extract":
    out = surgery.run_extract(args.src, args.branch, args.dst, reset_optimizer=args.reset_optimizer,
                              weights=args.weights)
  else:
    out = None
  print(surgery.describe_checkpoint(out if out is not None else args.checkpoint))


def run():
  """Console entry (`one-jax-surgery`): main's return value is the exit status."""
  sys.exit(main())


if __name__ == "__main__":
  run()
