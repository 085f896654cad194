"""Runs `python -m one_jax.main ARGS` with one fault injected, for tests/reliability/.

  python tests/fault_injection.py --config=... --workdir=...     (fault from $ONE_JAX_FAULT)

ONE_JAX_FAULT:
  signal_at_step=SIGTERM:K[:N]  the process sends itself the signal (N times, default once)
                            as it takes its K-th training batch (1-based, counted in this
                            process; with the train set on the device, the K-th step's ids and
                            draws): the dispatch holding step K runs, then the run stops as it
                            would on a real preemption (twice: at once, as on a second signal).
  nan_at_step=K             the K-th training batch of this process is all NaN (the run is given
                            --config.data_on_device=false: uint8 pixels on a device cannot be).
  block_in_save=STEP        the checkpoint save of STEP stops just before its commit (every
                            file written in STEP.orbax-checkpoint-tmp, the rename to STEP not
                            done), writes the file $ONE_JAX_FAULT_MARKER and sleeps: the test
                            kills the process there (SIGKILL), as a machine loss would.
"""
import os
import runpy
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _wrap_train_batches(on_batch, names=("train_batches", "train_plans")):
  from one_jax.data import in_memory  # pylint: disable=g-import-not-at-top
  taken = [0]
  for name in names:
    _wrap(in_memory, name, on_batch, taken)


def _wrap(module, name, on_batch, taken):
  original = getattr(module, name)

  class Batches:
    def __init__(self, inner):
      self.inner = inner

    def __iter__(self):
      return self

    def __next__(self):
      batch = next(self.inner)
      taken[0] += 1
      return on_batch(taken[0], batch)

    def close(self):
      if hasattr(self.inner, "close"):
        self.inner.close()

  def train_batches(*args, **kwargs):
    return Batches(iter(original(*args, **kwargs)))

  setattr(module, name, train_batches)


def _signal_at_step(spec):
  name, k, *times = spec.split(":")
  signum, k, times = getattr(signal, name), int(k), int(times[0]) if times else 1

  def on_batch(n, batch):
    if n == k:
      for _ in range(times):
        os.kill(os.getpid(), signum)
    return batch
  _wrap_train_batches(on_batch)


def _nan_at_step(k):
  import numpy as np  # pylint: disable=g-import-not-at-top

  def on_batch(n, batch):
    if n == int(k):
      batch = dict(batch, image=np.full_like(batch["image"], np.nan))
    return batch
  _wrap_train_batches(on_batch, names=("train_batches",))
  sys.argv.append("--config.data_on_device=false")


def _block_in_save(step):
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self, *args, **kwargs):
    if self.get_final().name == str(step):
      with open(os.environ["ONE_JAX_FAULT_MARKER"], "w") as f:
        f.write(str(self.get()))
      while True:
        time.sleep(60)
    return await original(self, *args, **kwargs)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize


def main():
  fault = os.environ.get("ONE_JAX_FAULT", "")
  if fault:
    kind, _, arg = fault.partition("=")
    {"signal_at_step": _signal_at_step, "nan_at_step": _nan_at_step,
     "block_in_save": _block_in_save}[kind](arg)
  runpy.run_module("one_jax.main", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()
