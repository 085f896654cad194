"""Compile time of a plain Flax CIFAR ResNet train step: the yardstick for one_jax's own.

A textbook ResNet of basic blocks (flax.linen.Conv, BatchNorm, unrolled Python loops; no
one_jax code), one value_and_grad + optax SGD-with-momentum step, jitted, lowered and compiled
at the given batch; prints one JSON line per depth with lower_s (tracing and lowering) and
compile_s (XLA alone). Compare their sum with `python -m one_jax.bench ... --batch=B --steps=1
--noeval`'s compile_s (which includes lowering) on the same machine (benchmarks/NOTES.md
entries 18 and 19).

  python benchmarks/plain_flax_compile.py --depths=20,56,110 --batch=8
"""
import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


class Block(nn.Module):
  planes: int
  stride: int

  @nn.compact
  def __call__(self, x, train):
    norm = lambda: nn.BatchNorm(use_running_average=not train)  # noqa: E731
    out = nn.relu(norm()(nn.Conv(self.planes, (3, 3), self.stride, use_bias=False)(x)))
    out = norm()(nn.Conv(self.planes, (3, 3), 1, use_bias=False)(out))
    if self.stride != 1 or x.shape[-1] != self.planes:
      x = norm()(nn.Conv(self.planes, (1, 1), self.stride, use_bias=False)(x))
    return nn.relu(out + x)


class ResNet(nn.Module):
  depth: int
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train=True):
    n = (self.depth - 2) // 6
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(
        nn.Conv(16, (3, 3), use_bias=False)(x)))
    for planes, stride in ((16, 1), (32, 2), (64, 2)):
      for i in range(n):
        x = Block(planes, stride if i == 0 else 1)(x, train)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def compile_seconds(depth: int, batch: int):
  """(lower_s, compile_s): tracing + lowering, then XLA's compile alone."""
  model = ResNet(depth)
  images = jnp.zeros((batch, 32, 32, 3))
  labels = jnp.zeros((batch,), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images[:1])
  tx = optax.sgd(0.1, momentum=0.9)
  opt_state = jax.eval_shape(tx.init, variables["params"])

  def step(params, stats, opt_state, images, labels):
    def loss_fn(p):
      logits, new = model.apply({"params": p, "batch_stats": stats}, images,
                                mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new
    (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new["batch_stats"], opt_state, loss

  t0 = time.perf_counter()
  lowered = jax.jit(step, donate_argnums=(0, 1, 2)).lower(
      variables["params"], variables["batch_stats"], opt_state, images, labels)
  t1 = time.perf_counter()
  lowered.compile()
  return t1 - t0, time.perf_counter() - t1


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--depths", default="20,56,110")
  parser.add_argument("--batch", type=int, default=8)
  args = parser.parse_args()
  for depth in (int(d) for d in args.depths.split(",")):
    lower_s, compile_s = compile_seconds(depth, args.batch)
    print(json.dumps({"model": "plain_flax_resnet_basic", "depth": depth, "batch": args.batch,
                      "lower_s": round(lower_s, 2), "compile_s": round(compile_s, 2),
                      "backend": jax.default_backend()}), flush=True)


if __name__ == "__main__":
  main()
