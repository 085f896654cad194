"""Several steps per dispatch and the train set on the device (DESIGN.md section 8): both give
the training of one step per call on host batches, bit for bit, on 1 and 2 devices; a
non-finite step inside a dispatch keeps no state after it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from one_jax import parallel
from one_jax.architectures import model_spec
from one_jax.data import device_data, in_memory, sources
from one_jax.training import optimizer, preemption, steps, train, train_state

STEPS = 4


def _setup(tiny_config, devices):
  config = tiny_config("three_branch", batch_size=16, synthetic_train_size=128)
  mesh = parallel.make_mesh(jax.devices()[:devices])
  source, _, info = sources.get_datasets(config)
  spec = model_spec.ModelSpec.from_config(config)
  tx = optimizer.create_optimizer(config, 8, spec.abstract_variables(info.image_shape)["params"])
  fresh = train_state.initial_state(spec, tx, info.image_shape, jax.random.key(config.seed))
  sums = steps.zero_sums(config, spec, tx, mesh, fresh, info.image_shape)
  return config, spec, mesh, source, tx, fresh, sums


def _train(setup, k, on_device, feed=None):
  """(state, sums, [guards]) after STEPS steps of epoch 0 in dispatches of up to k steps."""
  config, spec, mesh, source, tx, fresh, sums = setup
  step = steps.make_dispatch_step(config, spec, tx, mesh, on_device)
  where = dict(global_batch=config.batch_size, seed=config.seed, epoch=0)
  items = list(feed if feed is not None else (
      in_memory.train_plans(len(source), **where) if on_device
      else in_memory.train_batches(source, **where)))[:STEPS]
  extra = (device_data.put(source, mesh),) if on_device else ()
  state, sums = parallel.replicate(fresh, mesh), parallel.replicate(sums, mesh)
  guards = []
  for start in range(0, len(items), k):
    state, sums, guard = step(state, sums, steps.stack_steps(items[start:start + k], mesh),
                              jnp.float32(0), *extra)
    guards.append(parallel.to_host(guard))
  return parallel.to_host(state), parallel.to_host(sums), guards


@pytest.fixture(scope="module", params=[1, 2], ids=["1_device", "2_devices"])
def runs(request, tiny_config):
  setup = _setup(tiny_config, request.param)
  return {name: _train(setup, k, on_device) for name, k, on_device in (
      ("host_k1", 1, False), ("device_k1", 1, True), ("device_k3", 3, True))}


def _assert_identical(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_data_on_device_trains_bit_identically_to_host_batches(runs):
  _assert_identical(runs["host_k1"][:2], runs["device_k1"][:2])


def test_three_steps_per_dispatch_train_bit_identically_to_one(runs):
  # Dispatches of 3 steps and 1 (the remainder) against four of one step.
  _assert_identical(runs["device_k1"][:2], runs["device_k3"][:2])
  assert [int(g["first_bad"]) for g in runs["device_k3"][2]] == [3, 1]  # all finite


def test_device_augmentation_is_the_host_batch(tiny_config):
  config = tiny_config(batch_size=16, synthetic_train_size=64)
  source, _, _ = sources.get_datasets(config)
  where = dict(global_batch=16, seed=3, epoch=2, start_step=1, process_index=1, process_count=2)
  host = next(in_memory.train_batches(source, **where))
  plan = next(in_memory.train_plans(len(source), **where))
  data = {"image": jnp.asarray(source.images), "label": jnp.asarray(source.labels)}
  _assert_identical(host, jax.jit(device_data.augment)(data, plan))


def test_non_finite_step_inside_a_dispatch_is_found_and_not_counted(tiny_config):
  setup = _setup(tiny_config, 1)
  source, where = setup[3], dict(global_batch=16, seed=setup[0].seed, epoch=0)
  batches = list(in_memory.train_batches(source, **where))[:STEPS]
  nan = dict(batches[1], image=np.full_like(batches[1]["image"], np.nan))
  state, sums, guards = _train(setup, 3, False, feed=[batches[0], nan, batches[2]])
  # Step 2 (index 1 of a dispatch of 3) is found with its flags, and the sums are those after
  # step 1: nothing of step 2 or 3 is counted (the state is the loop's to drop: it raises).
  del state
  assert [int(g["first_bad"]) for g in guards] == [1]
  flags = parallel.to_host(guards[0]["flags"])
  assert not flags.gradients and not flags.update and not flags.terms["loss"]
  assert not bool(guards[0]["flags"].ok())
  config, spec, mesh, _, tx, fresh, zero = setup
  step = steps.make_dispatch_step(config, spec, tx, mesh)
  after_one = step(parallel.replicate(fresh, mesh), parallel.replicate(zero, mesh),
                   steps.stack_steps(batches[:1], mesh), jnp.float32(0))
  _assert_identical(parallel.to_host(after_one[1]), sums)


def test_multi_process_runs_share_the_stop_flag_every_few_steps():
  stop = preemption.StopRequest()
  stop.signal_name = "SIGTERM"
  every = train.STOP_SYNC_STEPS
  assert train._stop_requested(stop, 1, 3, 4)             # one process: at every dispatch
  assert not train._stop_requested(stop, 2, 1, every - 1)  # no round trip inside an interval
  assert train._stop_requested(stop, 2, every - 1, every + 2)  # shared when one is crossed
  assert train._stop_requested(stop, 2)                   # and at every epoch's end


def test_data_on_device_auto_takes_in_memory_sets_that_fit():
  small = in_memory.ArraySource(np.zeros((4, 8, 8, 3), np.uint8), np.zeros(4))
  assert device_data.use_device_data("auto", small)
  assert not device_data.use_device_data("false", small)
  big = in_memory.ArraySource(np.broadcast_to(np.zeros((), np.uint8), (
      device_data.MAX_AUTO_BYTES // 3072 + 1, 32, 32, 3)), np.zeros(
          device_data.MAX_AUTO_BYTES // 3072 + 1))
  assert not device_data.use_device_data("auto", big)
  streamed = in_memory.TfdsSource([])
  assert not device_data.use_device_data("auto", streamed)
  with pytest.raises(ValueError, match="needs an in-memory train set"):
    device_data.use_device_data("true", streamed)
