"""Evaluation: the test metrics of a state, and evaluation-only runs (DESIGN.md section 9).

Every test example counts exactly once (padded batches carry a mask), every head of the run's
method is scored, and an example whose logits are not all finite counts as wrong
(steps.topk_correct).
"""
import json
import os
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from one_jax import parallel
from one_jax.architectures import model_spec
from one_jax.data import in_memory, sources
from one_jax.storage import checkpoints
from one_jax.training import (methods, metric_writers, program_cache, steps, temporal_mean,
                              voting)


def evaluate(method, eval_step, mesh, variables, test_source, *, batch_size: int,
             process_index: int = 0, process_count: int = 1) -> Dict[str, float]:
  """Test loss and top-1/top-5 of every head (method.heads and the derived ones) over every
  test example exactly once, in global batches of batch_size."""
  totals = None
  for batch in in_memory.eval_batches(test_source, global_batch=batch_size,
                                           process_index=process_index,
                                           process_count=process_count):
    sums = eval_step(variables, parallel.shard_batch(batch, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = parallel.to_host(totals)
  count = float(totals.pop("count"))
  metrics = {k: float(v) / count for k, v in totals.items()}
  metrics["test/count"] = count
  return method.with_derived(metrics, "test")


def evaluate_checkpoint(config, spec: model_spec.ModelSpec, variables,
                        test_source) -> Dict[str, float]:
  """Evaluate-only mode: test metrics of a restored model on this config's test set (its
  evaluation step kept with the run's compilation cache, as a training run's is)."""
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  eval_step = steps.make_eval_step(config, spec, mesh, program_cache.directory_of(config))
  # Each process feeds its rows of every batch.
  return evaluate(methods.for_model(config, spec), eval_step, mesh,
                  parallel.replicate(jax.tree.map(np.asarray, variables), mesh), test_source,
                  batch_size=config.eval_batch_size, process_index=jax.process_index(),
                  process_count=jax.process_count())


def run_eval_only(config, workdir: str) -> Dict[str, float]:
  """Evaluates config.init_from (or the workdir's latest checkpoint) and prints the results.

  With config.vote, also the voting table over every subset of branches (voting.csv; PCL's:
  of its temporal-mean peers, the deployed networks). The checkpoint and the test set are read
  once for both.
  """
  path = config.init_from or workdir
  _, test_source, info = sources.get_datasets(config)
  spec, variables = checkpoints.load(path)
  if spec.num_classes != info.num_classes:
    raise ValueError(
        f"{path} holds a model of {spec.num_classes} classes but the test set has "
        f"{info.num_classes} (--config.num_classes={config.num_classes}, dataset "
        f"{info.name}): evaluate it on data of its own {spec.num_classes} classes "
        "(nothing was written)")
  checkpoints.check_finite(variables, path, "it cannot be evaluated")
  method = methods.for_model(config, spec)
  if config.vote and not method.votes:
    raise ValueError(f"{path} holds a {spec.describe()}: voting needs a ONE model with branches")
  metrics = evaluate_checkpoint(config, spec, variables, test_source)
  os.makedirs(workdir, exist_ok=True)
  table = metric_writers.summary_table([dict(metrics, epoch=1)], list(method.heads),
                                      method.deployed_head)
  if jax.process_index() == 0:
    print(f"Evaluation of {path} on {metrics['test/count']:.0f} test examples:\n{table}")
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(metrics, f, indent=2)
  if config.vote:   # PCL votes with its deployed networks, the temporal-mean peers
    voters = (temporal_mean.model_variables(variables["temporal_mean"]) if spec.temporal_mean
              else variables)
    forward = steps.make_vote_forward(config, spec, parallel.make_mesh(),
                                      program_cache.directory_of(config))
    vote_rows = voting.vote_accuracies(
        spec.build(), jax.device_put(jax.tree.map(np.asarray, voters)),
        in_memory.eval_batches(test_source, global_batch=config.eval_batch_size),
        voting.rules_for(spec.has_gate), forward=forward)
    if jax.process_index() == 0:
      print(voting.format_vote_table(vote_rows))
      voting.write_vote_csv(vote_rows, os.path.join(workdir, "voting.csv"))
  return metrics
