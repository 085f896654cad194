"""Where a deep network's train-step compile time goes: one_jax's model alone, then each piece
of the step added, each lowered and compiled on its own (benchmarks/NOTES.md entry 19).

Rows, for a config's architecture at the given batch (all float32, no compilation cache):
  model_plain   one_jax's model (the config's family) in a plain step: value_and_grad of the
                mean cross-entropy of every head's logits + optax SGD with momentum, jitted
  + method      the same with the method's loss (ONE: branches, ensemble, KL) and one_jax's optimizer
  train_step    steps.make_train_step: shard_map, pmean, update masks, metrics, non-finite flags
  dispatch      steps.make_dispatch_step, host batches (what a run compiles with data on the host)
  dispatch_dev  steps.make_dispatch_step with the train set on the device (augmented in the step)
each with conv_impl 'xla' and 'kernel'. lower_s is tracing + lowering, compile_s XLA alone.

  python benchmarks/compile_breakdown.py --config=configs/paper.py:resnet110_cifar10 --batch=8
"""
import argparse
import importlib.util
import json
import time

import jax
import jax.numpy as jnp
import optax

from one_jax import parallel
from one_jax.architectures import model_spec
from one_jax.data import device_data, in_memory
from one_jax.training import methods, optimizer, steps, train_state


def load_config(spec_arg):
  path, _, arg = spec_arg.partition(":")
  module_spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def timed(fn, *args):
  t0 = time.perf_counter()
  lowered = fn.lower(*args)
  t1 = time.perf_counter()
  lowered.compile({})
  return round(t1 - t0, 2), round(time.perf_counter() - t1, 2)


def plain_step(config, spec, use_method):
  model = spec.build()
  method = methods.for_model(config, spec)

  def step(params, stats, opt_state, images, labels):
    def loss_fn(p):
      output, new = model.apply(dict(others, params=p, batch_stats=stats), images, train=True,
                                mutable=["batch_stats"])
      if use_method:
        loss, _ = method.loss(output, labels, jnp.float32(1.0))
      else:
        loss = sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                   for logits in method.head_logits(output).values())
      return loss, new
    (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new["batch_stats"], opt_state, loss

  shape = (32, 32, 3)
  variables = spec.abstract_variables(shape)
  others = {k: v for k, v in variables.items() if k not in ("params", "batch_stats")}
  others = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), others)
  tx = (optimizer.create_optimizer(config, 100, variables["params"]) if use_method
        else optax.sgd(0.1, momentum=0.9))
  opt_state = jax.eval_shape(tx.init, variables["params"])
  images = jax.ShapeDtypeStruct((config.batch_size,) + shape, jnp.float32)
  labels = jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)
  return jax.jit(step, donate_argnums=(0, 1, 2)), (variables["params"], variables["batch_stats"],
                                                  opt_state, images, labels)


def full_steps(config, spec):
  mesh = parallel.make_mesh()
  shape = (32, 32, 3)
  tx = optimizer.create_optimizer(config, 100, spec.abstract_variables(shape)["params"])
  state = parallel.replicate(train_state.initial_state(spec, tx, shape, jax.random.key(0)), mesh)
  n = config.batch_size
  batch = {"image": jax.ShapeDtypeStruct((n,) + shape, jnp.float32),
           "label": jax.ShapeDtypeStruct((n,), jnp.int32)}
  epoch = jax.ShapeDtypeStruct((), jnp.float32)
  _, metrics, _ = jax.eval_shape(steps.make_train_step(config, spec, tx, mesh), state, batch, epoch)
  sums = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in metrics.items()}
  batches = jax.tree.map(lambda s: jax.ShapeDtypeStruct((1,) + s.shape, s.dtype), batch)
  yield "train_step", steps.make_train_step(config, spec, tx, mesh), (state, batch, epoch)
  yield "dispatch", steps.make_dispatch_step(config, spec, tx, mesh), (state, sums, batches, epoch)
  source, _ = in_memory.synthetic_sources(n, 1, config.num_classes, config.seed, shape)
  plans = steps.stack_steps(list(in_memory.train_plans(n, global_batch=n, seed=0, epoch=0)), mesh)
  yield "dispatch_dev", steps.make_dispatch_step(config, spec, tx, mesh, on_device=True), (
      state, sums, plans, epoch, device_data.put(source, mesh))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/paper.py:resnet110_cifar10")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--impls", default="xla,kernel")
  parser.add_argument("--rows", default="model_plain,method,train_step,dispatch,dispatch_dev")
  args = parser.parse_args()
  rows = args.rows.split(",")
  for impl in args.impls.split(","):
    config = load_config(args.config)
    with config.unlocked():
      config.batch_size, config.conv_impl = args.batch, impl
      config.compilation_cache_dir = ""
    spec = model_spec.ModelSpec.from_config(config)
    programs = []
    if "model_plain" in rows:
      programs.append(("model_plain",) + plain_step(config, spec, False))
    if "method" in rows:
      programs.append(("method",) + plain_step(config, spec, True))
    programs += [p for p in full_steps(config, spec) if p[0] in rows]
    for name, fn, fn_args in programs:
      lower_s, compile_s = timed(fn, *fn_args)
      print(json.dumps({"row": name, "conv_impl": impl, "model": config.model,
                        "depth": config.depth, "batch": args.batch, "lower_s": lower_s,
                        "compile_s": compile_s}), flush=True)


if __name__ == "__main__":
  main()
