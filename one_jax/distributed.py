"""Multi-process start-up: jax.distributed before anything touches devices (DESIGN.md section 7).

Three ways a run becomes multi-process, tried in this order:

  1. Explicit: a coordinator address, process count and process id, from the arguments
     (main.py's --coordinator_address, --num_processes, --process_id) or, for those not
     given, the environment: ONE_JAX_COORDINATOR (host:port of process 0),
     ONE_JAX_NUM_PROCESSES and ONE_JAX_PROCESS_ID. launch/local.sh uses these.
  2. Detected: on a Cloud TPU VM (libtpu and TPU chips present) and inside a SLURM job step
     with more than one task (srun), jax.distributed.initialize() is called without
     arguments and JAX reads the topology itself. ONE_JAX_DISTRIBUTED=off disables this.
  3. Otherwise a single process: nothing is initialised.

ONE_JAX_DISTRIBUTED=on calls jax.distributed.initialize() without arguments in any case
(JAX's other detectors: Open MPI, Kubernetes). On CPU, cross-process collectives use gloo.
"""
import glob
import importlib.util
import os
from typing import Optional

ENV_COORDINATOR = "ONE_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "ONE_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "ONE_JAX_PROCESS_ID"
ENV_MODE = "ONE_JAX_DISTRIBUTED"    # auto (default) | on | off
_SLURM_STEP = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")


def _int_setting(name: str, value) -> Optional[int]:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name}={value!r} is not an integer") from None


def detected_cluster(environ=None) -> Optional[str]:
  """'tpu' on a Cloud TPU VM, 'slurm' in a multi-task SLURM job step, else None."""
  environ = os.environ if environ is None else environ
  if all(k in environ for k in _SLURM_STEP) and _int_setting("SLURM_NTASKS",
                                                             environ["SLURM_NTASKS"]) > 1:
    return "slurm"
  if "TPU_WORKER_HOSTNAMES" in environ or "MEGASCALE_COORDINATOR_ADDRESS" in environ:
    return "tpu"
  if (importlib.util.find_spec("libtpu") is not None
      and (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))):
    return "tpu"
  return None


def settings(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
             process_id: Optional[int] = None, environ=None):
  """(coordinator, num_processes, process_id): the arguments, else the ONE_JAX_* environment."""
  environ = os.environ if environ is None else environ
  coordinator = coordinator_address or environ.get(ENV_COORDINATOR) or None
  count = (num_processes if num_processes is not None else
           _int_setting(ENV_NUM_PROCESSES, environ.get(ENV_NUM_PROCESSES)))
  index = (process_id if process_id is not None else
           _int_setting(ENV_PROCESS_ID, environ.get(ENV_PROCESS_ID)))
  given = {"coordinator address (--coordinator_address / $ONE_JAX_COORDINATOR)": coordinator,
           "process count (--num_processes / $ONE_JAX_NUM_PROCESSES)": count,
           "process id (--process_id / $ONE_JAX_PROCESS_ID)": index}
  missing = [name for name, value in given.items() if value is None]
  if len(missing) == len(given):
    return None, None, None
  if missing:
    raise ValueError(f"a multi-process run needs all three of coordinator address, process "
                     f"count and process id; missing the {' and the '.join(missing)}")
  if count < 1 or not 0 <= index < count:
    raise ValueError(f"process id {index} and process count {count} are invalid: the count "
                     "must be positive and the id in 0..count-1")
  return coordinator, count, index


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> bool:
  """Starts jax.distributed when the run is multi-process; True if it did.

  Must run before anything touches devices (jax.devices(), the first array, ...).
  """
  import jax  # pylint: disable=g-import-not-at-top  (callers set XLA_FLAGS first)
  mode = os.environ.get(ENV_MODE, "auto").strip().lower() or "auto"
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"{ENV_MODE}={mode!r} is invalid: use auto, on or off")
  coordinator, count, index = settings(coordinator_address, num_processes, process_id)
  # Gloo collectives between CPU processes (the GPU and TPU backends bring their own).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator is not None:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=count,
                               process_id=index)
    return True
  if mode == "on" or (mode == "auto" and detected_cluster()):
    jax.distributed.initialize()
    return True
  return False
