"""The persistent compilation cache: on by default, shared by runs and benchmarks, never fatal."""
import json
import os
import subprocess
import sys

import jax

from one_jax.training import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_auto_is_the_jax_variable_else_the_user_cache(monkeypatch):
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/somewhere/xla")
  assert compile_cache.resolve("auto") == "/somewhere/xla"
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  assert compile_cache.resolve("auto") == os.path.expanduser("~/.cache/one_jax/xla")
  assert compile_cache.resolve("") == ""
  assert compile_cache.resolve("rel/dir") == os.path.abspath("rel/dir")


def test_an_unusable_directory_is_a_warning_and_no_cache(tmp_path, capsys):
  before = jax.config.jax_compilation_cache_dir
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  try:
    assert compile_cache.enable(str(blocker / "xla")) is None
    err = capsys.readouterr().err
    assert err.startswith("warning: compilation cache ") and "compiling without it" in err
    assert err.count("\n") == 1
    assert jax.config.jax_compilation_cache_dir is None
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return env


def test_a_second_benchmark_process_loads_the_step_from_the_cache(tmp_path):
  cache = str(tmp_path / "xla")
  command = [sys.executable, "-m", "one_jax.bench", "--config=configs/step1.py:baseline,smoke",
             "--batch=8", "--steps=1", "--warmup=0", "--noeval",
             f"--config.compilation_cache_dir={cache}"]
  results = []
  for _ in range(2):
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=_env())
    assert done.returncode == 0, done.stderr
    results.append(json.loads(done.stdout.strip().splitlines()[-1]))
  assert [r["compile_cache"] for r in results] == ["miss", "hit"]
  assert os.listdir(cache)
  off = subprocess.run(command[:-1] + ["--config.compilation_cache_dir="], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=_env())
  assert off.returncode == 0, off.stderr
  assert json.loads(off.stdout.strip().splitlines()[-1])["compile_cache"] == "off"


def test_a_run_says_where_its_step_came_from(tmp_path):
  cache = str(tmp_path / "xla")
  lines = []
  for i in range(2):
    done = subprocess.run(
        [sys.executable, "-m", "one_jax.main", "--config=configs/step1.py:baseline,smoke",
         "--config.progress_bar=False", "--config.num_epochs=1", f"--workdir={tmp_path}/run{i}",
         f"--config.compilation_cache_dir={cache}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())
    assert done.returncode == 0, done.stderr
    lines.append([l for l in done.stdout.splitlines() if l.startswith("train step: ")])
  assert lines[0][0].startswith("train step: compiled (now cached), its traced program now "
                                "cached, first dispatch ")
  assert lines[1][0].startswith("train step: from the compilation cache, its traced program "
                                "from the cache too, first dispatch ")
  kept = os.listdir(os.path.join(cache, "programs"))
  # the train step, the init and the evaluation step; the two steps' metrics' shapes
  assert sorted(n.split(".", 1)[1] for n in kept) == ["exported"] * 3 + ["shapes.json"] * 2


def _program(tmp_path, identity="a run"):
  """A CachedProgram of the smoke config's dispatch step and its arguments (one device)."""
  from configs import step1  # pylint: disable=g-import-not-at-top
  from one_jax import parallel  # pylint: disable=g-import-not-at-top
  from one_jax.architectures import model_spec  # pylint: disable=g-import-not-at-top
  from one_jax.data import in_memory  # pylint: disable=g-import-not-at-top
  from one_jax.training import optimizer, program_cache, steps, train_state  # pylint: disable=g-import-not-at-top
  config = step1.get_config("three_branch,smoke")
  config.batch_size = 8
  mesh = parallel.make_mesh(jax.devices()[:1])
  spec = model_spec.ModelSpec.from_config(config)
  tx = optimizer.create_optimizer(config, 10, spec.abstract_variables()["params"])
  fresh = train_state.initial_state(spec, tx, (32, 32, 3), jax.random.key(0))
  source, _ = in_memory.synthetic_sources(16, 1, 10, 0, (32, 32, 3))
  batches = steps.stack_steps(list(in_memory.train_batches(source, global_batch=8, seed=0,
                                                           epoch=0))[:2], mesh)
  sums = steps.zero_sums(config, spec, tx, mesh, fresh, (32, 32, 3))

  def args():
    return (parallel.replicate(fresh, mesh), parallel.replicate(sums, mesh), batches,
            jax.numpy.float32(1.0))

  step = steps.make_dispatch_step(config, spec, tx, mesh, steps_per_epoch=10,
                                  program_dir=str(tmp_path / "programs"))
  assert isinstance(step, program_cache.CachedProgram)
  plain = steps.make_dispatch_step(config, spec, tx, mesh)
  return step, plain, args


def test_a_traced_program_is_kept_and_loaded_with_the_same_results(tmp_path):
  """The second program object (a later process) loads the step instead of tracing it, and
  both compute exactly what the plain jitted step computes."""
  first, plain, args = _program(tmp_path)
  expected = plain(*args())
  got = first(*args())
  assert first.source == "traced" and len(os.listdir(tmp_path / "programs")) == 1
  second, _, _ = _program(tmp_path)
  again = second(*args())
  assert second.source == "cache"

  def no_more(*unused, **unused_kw):
    raise AssertionError("a dispatch of a compiled signature named or compiled a program")
  second.key = second.compile = no_more   # later dispatches: one lookup by shapes and dtypes
  third = second(*args())
  for result in (got, again, third):
    assert jax.tree.structure(result) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(result), jax.tree.leaves(expected)):
      assert (jax.numpy.asarray(a) == jax.numpy.asarray(b)).all()


def test_a_damaged_program_file_is_a_warning_then_traced(tmp_path, capsys):
  first, _, args = _program(tmp_path)
  first(*args())
  (name,) = os.listdir(tmp_path / "programs")
  (tmp_path / "programs" / name).write_bytes(b"not a program")
  second, _, _ = _program(tmp_path)
  second(*args())
  err = capsys.readouterr().err
  assert second.source == "traced" and err.startswith("warning: traced program ")
  assert "tracing the step again" in err and err.count("\n") == 1
  third, _, _ = _program(tmp_path)   # the damaged file was replaced by a good one
  third(*args())
  assert third.source == "cache"


def test_a_program_is_found_by_what_determines_it(tmp_path):
  """What the traced step holds besides its arguments (the config's learning rate, the steps
  per epoch of the schedule) makes another program; the same run finds the same one."""
  from configs import step1  # pylint: disable=g-import-not-at-top
  from one_jax import parallel  # pylint: disable=g-import-not-at-top
  from one_jax.architectures import model_spec  # pylint: disable=g-import-not-at-top
  from one_jax.training import steps  # pylint: disable=g-import-not-at-top
  config = step1.get_config("three_branch,smoke")
  mesh = parallel.make_mesh(jax.devices()[:1])
  spec = model_spec.ModelSpec.from_config(config)
  identity = lambda c, spe: steps.program_identity(c, spec, mesh, False, spe)
  faster = step1.get_config("three_branch,smoke")
  faster.lr = 0.5
  assert identity(config, 10) == identity(step1.get_config("three_branch,smoke"), 10)
  assert identity(config, 10) != identity(faster, 10)
  assert identity(config, 10) != identity(config, 11)
  step, _, args = _program(tmp_path)
  leaves, tree = jax.tree.flatten(args())
  assert step.key(leaves, tree) == _program(tmp_path)[0].key(leaves, tree)
  assert step.key(leaves, tree) != step.key(leaves[:-1] + [jax.numpy.int32(1)], tree)


def _zero_sums(program_dir):
  from configs import step1  # pylint: disable=g-import-not-at-top
  from one_jax import parallel  # pylint: disable=g-import-not-at-top
  from one_jax.architectures import model_spec  # pylint: disable=g-import-not-at-top
  from one_jax.training import optimizer, steps, train_state  # pylint: disable=g-import-not-at-top
  config = step1.get_config("three_branch,smoke")
  mesh = parallel.make_mesh(jax.devices()[:1])
  spec = model_spec.ModelSpec.from_config(config)
  tx = optimizer.create_optimizer(config, 10, spec.abstract_variables()["params"])
  fresh = train_state.initial_state(spec, tx, (32, 32, 3), jax.random.key(0))
  return steps.zero_sums(config, spec, tx, mesh, fresh, (32, 32, 3), program_dir)


def test_the_metrics_keys_are_kept_so_a_later_start_does_not_trace_for_them(
    tmp_path, monkeypatch, capsys):
  """zero_sums traces the whole train step to learn its metrics; the cache keeps the answer."""
  traced = _zero_sums(None)
  assert {"train/loss", "train/top1/ensemble", "train/top1/branch_2"} <= set(traced)
  programs = str(tmp_path / "programs")
  assert _zero_sums(programs).keys() == traced.keys()
  (name,) = os.listdir(programs)
  assert name.endswith(".shapes.json")

  def no_trace(*unused, **unused_kw):
    raise AssertionError("the train step was traced for its metrics")
  with monkeypatch.context() as m:
    m.setattr(jax, "eval_shape", no_trace)
    kept = _zero_sums(programs)
  assert {k: (v.shape, v.dtype) for k, v in kept.items()} == {
      k: (v.shape, v.dtype) for k, v in traced.items()}
  (tmp_path / "programs" / name).write_text('{"train/loss": "not shapes"}')
  assert _zero_sums(programs).keys() == traced.keys()   # damaged: a warning, traced again
  err = capsys.readouterr().err
  assert err.startswith("warning: traced shapes ") and err.count("\n") == 1
  assert json.loads((tmp_path / "programs" / name).read_text()).keys() == traced.keys()


def test_a_models_init_is_kept_and_loaded_with_the_plain_inits_bits(tmp_path, monkeypatch,
                                                                    capsys):
  """fresh_variables with a program directory: traced once, then loaded (no trace); the values
  are the plain init's, bit for bit, traced or loaded (PCL: its temporal mean too)."""
  from configs import step1  # pylint: disable=g-import-not-at-top
  from one_jax.architectures import model_spec  # pylint: disable=g-import-not-at-top
  from one_jax.training import train_state  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  config = step1.get_config("three_branch,smoke")
  config.method = "pcl"
  spec = model_spec.ModelSpec.from_config(config)
  programs = str(tmp_path / "programs")
  fresh = lambda d: train_state.fresh_variables(spec, (32, 32, 3), jax.random.key(3), d)

  def same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b) and "temporal_mean" in a
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      assert x.dtype == y.dtype and np.array_equal(x, y)

  plain = fresh(None)
  assert not os.path.exists(programs)
  same(fresh(programs), plain)
  (name,) = os.listdir(programs)

  def no_trace(*unused, **unused_kw):
    raise AssertionError("the init was traced again")
  with monkeypatch.context() as m:
    m.setattr(jax.export, "export", no_trace)
    same(fresh(programs), plain)
  (tmp_path / "programs" / name).write_bytes(b"not a program")
  same(fresh(programs), plain)
  err = capsys.readouterr().err
  assert err.startswith("warning: traced program ") and "tracing it again" in err
  assert err.count("\n") == 1


def test_the_evaluation_step_is_kept_and_loaded_with_the_same_sums(tmp_path, monkeypatch):
  from configs import step1  # pylint: disable=g-import-not-at-top
  from one_jax import parallel  # pylint: disable=g-import-not-at-top
  from one_jax.architectures import model_spec  # pylint: disable=g-import-not-at-top
  from one_jax.data import in_memory  # pylint: disable=g-import-not-at-top
  from one_jax.training import program_cache, steps  # pylint: disable=g-import-not-at-top
  config = step1.get_config("three_branch,smoke")
  mesh = parallel.make_mesh(jax.devices()[:1])
  spec = model_spec.ModelSpec.from_config(config)
  variables = parallel.replicate(spec.init(jax.random.key(0)), mesh)
  _, source = in_memory.synthetic_sources(8, 20, 10, 0, (32, 32, 3))
  (batch,) = list(in_memory.eval_batches(source, global_batch=20))[:1]
  batch = parallel.shard_batch(batch, mesh)
  programs = str(tmp_path / "programs")
  expected = steps.make_eval_step(config, spec, mesh)(variables, batch)
  first = steps.make_eval_step(config, spec, mesh, programs)
  assert isinstance(first, program_cache.CachedProgram)
  got = first(variables, batch)
  assert first.source == "traced"
  with monkeypatch.context() as m:   # a later process: nothing of the step is traced
    m.setattr(jax, "eval_shape", lambda *a, **k: (_ for _ in ()).throw(AssertionError("traced")))
    second = steps.make_eval_step(config, spec, mesh, programs)
    again = second(variables, batch)
  assert second.source == "cache"
  assert {"count", "test/loss", "test/top1/ensemble", "test/top5/branch_2"} <= set(expected)
  for result in (got, again):
    assert result.keys() == expected.keys()
    for k in expected:
      assert (jax.numpy.asarray(result[k]) == jax.numpy.asarray(expected[k])).all(), k


def test_the_vote_forward_is_kept_and_votes_as_the_plain_apply(tmp_path, monkeypatch):
  from configs import step2  # pylint: disable=g-import-not-at-top
  from one_jax import parallel  # pylint: disable=g-import-not-at-top
  from one_jax.architectures import model_spec  # pylint: disable=g-import-not-at-top
  from one_jax.data import in_memory  # pylint: disable=g-import-not-at-top
  from one_jax.training import program_cache, steps, voting  # pylint: disable=g-import-not-at-top
  config = step2.get_config("five_branch_vote,smoke")
  mesh = parallel.make_mesh(jax.devices()[:1])
  spec = model_spec.ModelSpec.from_config(config)
  variables = jax.device_put(spec.init(jax.random.key(0)))
  _, source = in_memory.synthetic_sources(8, 24, 10, 0, (32, 32, 3))

  def vote(forward=None):
    return voting.vote_accuracies(spec.build(), variables,
                                  in_memory.eval_batches(source, global_batch=16),
                                  forward=forward)

  expected = vote()
  programs = str(tmp_path / "programs")
  first = steps.make_vote_forward(config, spec, mesh, programs)
  assert isinstance(first, program_cache.CachedProgram)
  assert vote(first) == expected and first.source == "traced"
  with monkeypatch.context() as m:   # a later process: nothing of the forward is traced
    m.setattr(jax, "eval_shape", lambda *a, **k: (_ for _ in ()).throw(AssertionError("traced")))
    second = steps.make_vote_forward(config, spec, mesh, programs)
    assert vote(second) == expected
  assert second.source == "cache"
  assert len(expected) == 31 and expected[-1]["examples"] == 24
