"""The non-finite guard: which part of a train step went non-finite, and the loop's reaction.

A step reports `Flags` (per loss term, the gradients, the update) computed from scalars: the
loss terms it has anyway, and one reduction each over the gradients and the update (the sum
of all their entries times zero, which is finite exactly when every entry is and, unlike a
norm, cannot overflow on finite entries). The step applies its update unconditionally: selecting every
leaf of the new state against the old on a global flag made XLA keep both states alive and
multiplied compile time by 8-100 (benchmarks/NOTES.md entry 18). Instead the loop never keeps
what follows a bad step: `check` raises FloatingPointError naming the first bad step before
the state of its dispatch can reach a checkpoint, so the last good checkpoint stays the latest
(README, "Reliability").
"""
from typing import Dict, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from one_jax import parallel
from one_jax.training import optimizer


@flax.struct.dataclass
class Flags:
  """True where finite: each loss term by name, the gradients, the parameter update."""
  terms: Dict[str, jax.Array]
  gradients: jax.Array
  update: jax.Array

  @classmethod
  def of_step(cls, terms: Dict[str, jax.Array], grads, updates) -> "Flags":
    return cls(terms={k: jnp.isfinite(v) for k, v in terms.items()},
               gradients=all_finite(grads), update=all_finite(updates))

  def ok(self) -> jax.Array:
    """One bool: every flag is set."""
    return jnp.all(jnp.stack(list(self.terms.values()) + [self.gradients, self.update]))

  @classmethod
  def clean(cls, terms) -> "Flags":
    """All set, for these loss terms (a dispatch's guard before its first step)."""
    return cls(terms={t: jnp.bool_(True) for t in terms}, gradients=jnp.bool_(True),
               update=jnp.bool_(True))

  def bad_parts(self) -> list:
    """Host side: what went non-finite, in words ('loss terms kl, loss', 'gradients', ...)."""
    host = parallel.to_host(self)
    terms = [k for k, v in host.terms.items() if not bool(v)]
    parts = ([f"loss term{'s' if len(terms) > 1 else ''} {', '.join(terms)}"] if terms else [])
    parts += ["gradients"] * (not bool(host.gradients))
    parts += ["parameter update"] * (not bool(host.update))
    return parts


def all_finite(tree) -> jax.Array:
  """Whether every floating entry of the tree is finite, as one scalar: the sum of every entry
  times zero, which is NaN exactly when some entry is NaN or infinite (and 0 otherwise, so it
  cannot overflow).

  Not a maximum of magnitudes: XLA:CPU's vectorised max reduction drops NaN in large arrays
  (a NaN in a 300,000-entry leaf went unseen). One reduction over the leaves' concatenation,
  not one per leaf: per-leaf reductions of the averaged gradients cost ResNet-110's train step
  18 s of its 47 s compile (benchmarks/NOTES.md entry 19)."""
  leaves = [jnp.ravel(x) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return jnp.bool_(True)
  return jnp.isfinite(jnp.sum(jnp.concatenate(leaves) * 0))


def check(config, pending, steps_per_epoch: int, last_saved: Optional[int],
          ckpt_dir: str) -> None:
  """Raises FloatingPointError naming the first non-finite step of a dispatch (pending: its
  epoch, first step, step count and guard {'first_bad', 'flags'}). The state of that dispatch
  is never saved, so the last checkpoint is the last good state."""
  epoch, start, n, guard = pending
  first_bad = int(parallel.to_host(guard["first_bad"]))
  if first_bad == n:
    return
  index = start + first_bad
  kept = (f"the last good checkpoint, step {last_saved} in {ckpt_dir}, is kept" if last_saved
          else "no checkpoint had been written yet")
  lr = optimizer.epoch_learning_rate(config, epoch, steps_per_epoch)
  lr_now = f"--config.lr={config.lr}" + (
      f", {lr:.3g} in this epoch" if not np.isclose(lr, config.lr) else "")
  raise FloatingPointError(
      f"non-finite values at step {epoch * steps_per_epoch + index + 1} (epoch {epoch + 1}, "
      f"step {index + 1} of {steps_per_epoch}) in: {'; '.join(guard['flags'].bad_parts())}. "
      f"Training stopped without saving that update and {kept}: lower the learning rate "
      f"({lr_now}) or check the data, then start again with a new --workdir or "
      "--config.new_run=True (this workdir keeps the run's config)")
