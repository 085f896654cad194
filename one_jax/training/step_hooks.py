"""What happens at dispatch boundaries besides training: the line saying how the step was
compiled (or loaded from the compilation cache), the per-step log (config.log_every_steps) and
the profiler trace (config.profile_steps)."""
import os
import time

import jax

from one_jax import parallel
from one_jax.training import compile_cache, config_checks

PROFILE_DIR = "profile"   # under the workdir: the trace of config.profile_steps


class StepHooks:
  """Called before and after every dispatch of the training loop (see the module)."""

  def __init__(self, run, writer):
    self.run, self.writer = run, writer
    self.every = run.config.get("log_every_steps", 0)
    self.profile = config_checks.parse_profile_steps(run.config.get("profile_steps", ""))
    self.tracing = False
    self._last = None  # (step in epoch, host sums) of the last log line in this epoch
    self._first = None  # (cache lookups, start time) around the run's first dispatch
    self._done_first = False

  def start_epoch(self, epoch, first, sums):
    del epoch
    if self.every:
      self._last = (first, parallel.to_host(sums) if sums is not None else None)

  def before(self, step: int, n: int):
    """Starts the trace when the dispatch of steps step+1 .. step+n holds profile start; the
    run's first dispatch is watched for compilation."""
    if not self._done_first:
      self._first = (compile_cache.Lookups().__enter__(), time.perf_counter())
    if self.profile and self.run.is_main and not self.tracing and (
        step < self.profile[1] and step + n >= self.profile[0]):
      jax.profiler.start_trace(os.path.join(self.run.workdir, PROFILE_DIR))
      self.tracing = True

  def after(self, epoch, n_steps, state, sums):
    if not self._done_first:
      self._report_first(sums)
    spe = self.run.steps_per_epoch
    step = epoch * spe + n_steps
    if self.tracing and step >= self.profile[1]:
      self.stop_trace(state)
    if not self.every:
      return
    first, before = self._last
    if step // self.every == (epoch * spe + first) // self.every and n_steps < spe:
      return
    now = parallel.to_host(sums)  # the one device read of a log interval
    count = n_steps - first
    if count:
      means = {k: (float(v) - (float(before[k]) if before else 0.0)) / count
               for k, v in now.items()}
      self.writer.write_steps(step, dict(means, lr=float(self.run.log_step(step - 1))))
    self._last = (n_steps, now)

  def _report_first(self, sums):
    """One line: the first dispatch's time, and whether its program came from the cache."""
    lookups, t0 = self._first
    jax.block_until_ready(sums)
    lookups.__exit__(None, None, None)
    self._done_first = True
    if self.run.is_main:
      traced = {"cache": ", its traced program from the cache too",
                "traced": ", its traced program now cached"}.get(
                    getattr(self.run.dispatch_step, "source", None), "")
      print(f"train step: {lookups.describe()}{traced}, first dispatch "
            f"{time.perf_counter() - t0:.1f} s", flush=True)

  def stop_trace(self, state=None):
    if self.tracing:
      if state is not None:
        jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.tracing = False
      print(f"profile of steps {self.profile[0]}-{self.profile[1]} written to "
            f"{os.path.join(self.run.workdir, PROFILE_DIR)}", flush=True)

