"""Entry point: python -m one_jax.main --config=configs/step1.py:five_branch [--workdir=DIR].

Deliberately short (flax examples style): flags, workdir, one log line about the hosts and
devices, then one call into one_jax.training.train.
"""
import datetime
import os
import shlex
import sys
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import numpy as np

from one_jax import cli
from one_jax.cpu import host_memory
from one_jax.training import preemption

FLAGS = flags.FLAGS
flags.DEFINE_bool(host_memory.FLAG_NAME, True, host_memory.FLAG_HELP)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, plots). Default: "
                    "runs/<config variant>-<timestamp>, printed at start.")
config_flags.DEFINE_config_file("config", None, "Experiment config, e.g. "
                                "configs/step1.py:five_branch", lock_config=True)
# Multi-process runs (launch/): auto-detected on Cloud TPU VMs and in SLURM job steps.
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 of a multi-process "
                    "run (default $ONE_JAX_COORDINATOR); needs --num_processes, --process_id.")
flags.DEFINE_integer("num_processes", None, "Processes of the run (default "
                     "$ONE_JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "This process's id, 0..num_processes-1 (default "
                     "$ONE_JAX_PROCESS_ID).")


def default_workdir(config) -> str:
  import jax  # pylint: disable=g-import-not-at-top
  now = int(time.time())
  if jax.process_count() > 1:  # every process must name the same directory: process 0's clock
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    now = int(multihost_utils.broadcast_one_to_all(np.int32(now)))
  stamp = datetime.datetime.fromtimestamp(now).strftime("%Y%m%d-%H%M%S")
  return os.path.join("runs", f"{config.get('variant', 'run')}-{stamp}")


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}: options are --config, --workdir and "
                     "--config.FIELD=VALUE")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # library INFO logs (checkpointing) only on request
    # A failed save (a full disk) makes Orbax log the same error with a traceback from each
    # of its threads; the error itself ends the command as its one line.
    logging.get_absl_logger().addFilter(_no_orbax_error_tracebacks)
  host_memory.apply_for_cpu(FLAGS[host_memory.FLAG_NAME].value)   # before JAX's threads start
  config = FLAGS.config
  if config is None:
    raise ValueError("--config is required, e.g. --config=configs/step1.py:three_branch")
  if config.deterministic:
    # Must be set before the backend starts: deterministic reductions/scatters on GPU.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_gpu_deterministic_ops=true").strip()
  import jax  # pylint: disable=g-import-not-at-top  (after XLA_FLAGS)
  from one_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  from one_jax.training import compile_cache  # pylint: disable=g-import-not-at-top
  compile_cache.enable(config.get("compilation_cache_dir", "auto"))  # before any compilation
  from one_jax.storage import checkpoints, run_lock, workdirs  # pylint: disable=g-import-not-at-top
  from one_jax.training import train
  from one_jax.cpu import kernels  # pylint: disable=g-import-not-at-top
  checkpoints.quiet_orbax_noise()

  # Bad input ends here, before anything is written (train_and_evaluate writes nothing
  # before it has checked the data, the model and the checkpoint it resumes from).
  train.check_config(config)
  warning = kernels.off_warning(config.get("conv_impl", "auto"), jax.default_backend())
  if warning and jax.process_index() == 0:
    print(warning, file=sys.stderr, flush=True)
  workdir = FLAGS.workdir or default_workdir(config)
  moved = False
  if config.get("new_run", False):  # a fresh run beside an existing one, never over it
    # Process 0 decides: the others may look after it has started writing.
    suffix = int(workdirs.new_run_dir(workdir).rsplit("-", 1)[1]) if workdirs.holds_run(
        workdir) else 0
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      suffix = int(multihost_utils.broadcast_one_to_all(np.int32(suffix)))
    if suffix:
      workdir, moved = f"{os.path.normpath(workdir)}-{suffix}", True
  workdirs.check_usable(workdir)
  workdirs.check_not_inside_a_run(workdir)
  # One live run per workdir, from here to the end (a refused start writes nothing).
  lock = run_lock.hold(workdir, jax.process_index(), jax.process_count())
  try:
    _run_in(config, workdir, announce=jax.process_index() == 0 and (moved or not FLAGS.workdir))
  finally:
    if lock is not None:
      lock.release()


def _run_in(config, workdir: str, announce: bool) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from one_jax.storage import workdirs  # pylint: disable=g-import-not-at-top
  from one_jax.training import train
  if not config.eval_only:
    workdirs.check_config(config, workdir)
  if announce:
    print(f"workdir: {workdir}", flush=True)
  logging.info("process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].device_kind)
  try:
    train.run(config, workdir)  # step-2 surgery first; then evaluation only, or training
  except preemption.Interrupted as e:
    raise _Stopped(f"{e}; resume with the same command: {resume_command(workdir)}") from None
  except Exception as e:  # pylint: disable=broad-except
    if not _disk_full(e):
      raise
    raise OSError(f"no space left on the disk of {workdir}: free some space (or move the run "
                  "to another disk) and run the same command again, which resumes from the last "
                  f"complete checkpoint: {resume_command(workdir)} [{cli.one_line(e)[:300]}]"
                  ) from None
  except KeyboardInterrupt:  # a second signal: stopped at once, without a checkpoint
    found = workdirs.checkpoint_config(workdir)
    raise _StoppedAtOnce(
        "interrupted again while stopping: no checkpoint of the current step was written; " + (
            f"the last checkpoint (step {found[0]}) is intact and the same command resumes "
            f"from it: {resume_command(workdir)}" if found else
            "no checkpoint had been written yet, so the same command starts the run again: "
            f"{resume_command(workdir)}")) from None


class _Stopped(Exception):
  """Training stopped on a signal with a checkpoint (exit status EXIT_INTERRUPTED)."""


class _StoppedAtOnce(Exception):
  """A second signal stopped training at once (exit status 130, as for SIGINT)."""


def _no_orbax_error_tracebacks(record) -> bool:
  return not (record.levelno >= 40  # ERROR and record.exc_info
              and "orbax" in (record.pathname or ""))


def _disk_full(error: BaseException) -> bool:
  return getattr(error, "errno", None) == 28 or "No space left on device" in str(error)


def resume_command(workdir: str) -> str:
  """This command line with --workdir pinned to the run's directory (and without new_run)."""
  args, skip = [], False
  for arg in sys.argv[1:]:
    if skip:
      skip = False
    elif arg in ("--workdir", "-workdir"):
      skip = True
    elif not arg.startswith(("--workdir=", "-workdir=", "--config.new_run", "-config.new_run",
                             "--noconfig.new_run")):
      args.append(arg)
  return " ".join(shlex.quote(a) for a in ["python", "-m", "one_jax.main", *args,
                                           f"--workdir={workdir}"])


def run():
  """Console entry: bad input ends with a one-line `error: ...` and exit status 1, not a
  traceback; a run stopped by SIGTERM/SIGINT says how to resume and exits with 75."""
  try:
    sys.exit(cli.exit_status(app.run, main, flags_parser=cli.parse_flags, interrupted_note=(
        "before training started; nothing to resume from was written")))
  except _Stopped as e:
    print(f"interrupted: {e}", file=sys.stderr)
    sys.exit(preemption.EXIT_INTERRUPTED)
  except _StoppedAtOnce as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  run()
