"""The train step lowered for GPU and TPU from this CPU host (jax.export, platforms=): only XLA's
own convolutions and jax.grad's gradients, none of the CPU-tuned forms; the CPU program keeps
them. Nothing is compiled or run, so no accelerator is needed."""
import re

import jax
import jax.numpy as jnp
from jax import export
import pytest

from configs import step1
from one_jax import parallel
from one_jax.architectures import model_spec
from one_jax.training import optimizer, steps

BATCH = 32   # two 16-image slices: the CPU's sliced weight gradient would show


def _lowered(platform: str, **overrides) -> str:
  """StableHLO of the real train step (ONE, depth 8, B = 3) lowered for `platform`."""
  config = step1.get_config("three_branch,smoke")
  config.update(dict(batch_size=BATCH, **overrides))
  spec = model_spec.ModelSpec.from_config(config)
  tx = optimizer.create_optimizer(config, 10, spec.abstract_variables()["params"])
  state = dict(spec.abstract_variables())
  state["opt_state"] = jax.eval_shape(tx.init, state["params"])
  batch = {"image": jax.ShapeDtypeStruct((BATCH, 32, 32, 3), jnp.float32),
           "label": jax.ShapeDtypeStruct((BATCH,), jnp.int32)}
  epoch = jax.ShapeDtypeStruct((), jnp.float32)
  step = steps.make_train_step(config, spec, tx, parallel.make_mesh(jax.devices()[:1]))
  if platform == "cpu":   # the kernels' custom calls are not exportable: lower in place
    return step.lower(state, batch, epoch).as_text()
  return export.export(step, platforms=[platform])(state, batch, epoch).mlir_module()


def _convolutions(text: str):
  return [line for line in text.splitlines() if "stablehlo.convolution" in line]


def _conv_layers() -> int:
  """Convolution sites of the model: the stacked branches' layers count once (one site in the
  vmapped or scanned program)."""
  params = model_spec.ModelSpec("one_resnet", 8, 10, 3).abstract_variables()["params"]
  return sum(1 for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
             if "conv" in jax.tree_util.keystr(path) and path[-1].key == "kernel")


def _sliced(convolutions):
  """Convolutions over a 16-image slice of the batch (the CPU's weight-gradient form)."""
  return [c for c in convolutions if re.search(r"tensor<16x\d+x\d+x\d+x", c)]


@pytest.mark.parametrize("platform,branch_impl", [("cuda", "auto"), ("tpu", "auto"),
                                                  ("cuda", "vmap")])
def test_accelerator_programs_carry_only_xla_convolutions(platform, branch_impl):
  text = _lowered(platform, branch_impl=branch_impl)
  convs = _convolutions(text)
  # forward and two gradients per layer; the images need no gradient (stem input grad absent)
  assert len(convs) == 3 * _conv_layers() - 1
  assert "one_jax_conv" not in text          # no CPU kernel custom calls
  assert "HIGHEST" not in text               # no identity 1x1 copies (HIGHEST precision)
  assert not [c for c in convs if "tensor<1x1x" in c and re.search(r"x(\d+)x\1xf32>", c)
              and "stride" not in c]
  assert not _sliced(convs)
  assert all(re.search(r"tensor<32x", c) for c in convs)   # every one over the whole batch


def test_the_cpu_program_keeps_its_cpu_forms():
  """The same step lowered for the CPU: XLA's weight gradients over 16-image slices read
  through identity copies, or (conv_impl='auto' where the kernels run) the kernels' calls."""
  xla = _lowered("cpu", conv_impl="xla")
  convs = _convolutions(xla)
  assert len(convs) > 3 * _conv_layers() - 1
  assert "HIGHEST" in xla and _sliced(convs)
  assert "one_jax_conv" in _lowered("cpu", conv_impl="auto")


def test_bfloat16_programs_convolve_in_bfloat16():
  text = _lowered("cuda", compute_dtype="bfloat16")
  convs = _convolutions(text)
  assert len(convs) == 3 * _conv_layers() - 1
  for c in convs:
    operands = c.rsplit(" : ", 1)[1]
    assert "f32" not in operands and "bf16" in operands, c
  assert "one_jax_conv" not in text and "HIGHEST" not in text
