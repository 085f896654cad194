"""Entry point: python -m one_jax.main --config=configs/step1.py:five_branch [--workdir=DIR].

Deliberately short (flax examples style): flags, workdir, one log line about the hosts and
devices, then one call into train.py.
"""
import datetime
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import numpy as np

FLAGS = flags.FLAGS
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
    raise app.UsageError(f"unexpected arguments {argv[1:]}: options are --config, --workdir and "
                         "--config.FIELD=VALUE")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # library INFO logs (checkpointing) only on request
  config = FLAGS.config
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/step1.py:three_branch")
  if config.deterministic:
    # Must be set before the backend starts: deterministic reductions/scatters on GPU.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_gpu_deterministic_ops=true").strip()
  import jax  # pylint: disable=g-import-not-at-top  (after XLA_FLAGS)
  from one_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  from one_jax import train, two_stage  # pylint: disable=g-import-not-at-top

  workdir = FLAGS.workdir or default_workdir(config)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0 and not FLAGS.workdir:
    print(f"workdir: {workdir}", flush=True)
  logging.info("process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].device_kind)
  config = two_stage.prepare(config, workdir)  # step-2 variants: surgery into WORKDIR/init
  if config.eval_only:
    train.run_eval_only(config, workdir)
  else:
    train.train_and_evaluate(config, workdir)


def run():
  """Console entry: bad input ends with a one-line error and exit code 1, not a traceback."""
  try:
    app.run(main)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  run()
