"""The ONE loss against an independent NumPy computation of DESIGN.md section 3."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from one_jax.architectures import models
from one_jax.training import losses


def _numpy_softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _numpy_one_loss(branch_logits, ensemble, labels, epoch, temperature, rampup):
  """Section 3, written independently in float64 NumPy (reference: +1e-7 on the teacher)."""
  n = labels.shape[0]
  def ce(z):
    return -np.mean(np.log(_numpy_softmax(z)[np.arange(n), labels]))
  w = 1.0 if rampup == 0 else np.exp(-5 * (1 - np.clip(epoch / rampup, 0, 1)) ** 2)
  teacher = _numpy_softmax(ensemble / temperature) + 1e-7
  kl = 0.0
  for z in branch_logits:
    log_p = np.log(_numpy_softmax(z / temperature))
    kl += temperature ** 2 * np.sum(teacher * (np.log(teacher) - log_p)) / n
  return sum(ce(z) for z in branch_logits) + ce(ensemble) + w * kl


def _output(branch_logits, gate=None):
  b, n, _ = branch_logits.shape
  gate = jnp.full((n, b), 1.0 / b) if gate is None else gate
  return models.OneOutput(branch_logits=branch_logits, gate=gate,
                          ensemble_logits=jnp.einsum("nb,bnc->nc", gate, branch_logits))


@pytest.mark.parametrize("temperature", [1.0, 3.0, 5.0])
@pytest.mark.parametrize("epoch,rampup", [(0, 80), (17.5, 80), (40, 80), (200, 80), (3, 0)])
def test_matches_numpy_formula(temperature, epoch, rampup):
  rng = np.random.default_rng(0)
  branch_logits = rng.normal(size=(3, 16, 10)) * 3
  gate = _numpy_softmax(rng.normal(size=(16, 3)))
  out = _output(jnp.asarray(branch_logits, jnp.float32), jnp.asarray(gate, jnp.float32))
  labels = rng.integers(0, 10, size=16)
  loss, terms = losses.one_loss(out, jnp.asarray(labels), epoch=epoch,
                                temperature=temperature, rampup_epochs=rampup)
  expected = _numpy_one_loss(branch_logits, np.einsum("nb,bnc->nc", gate, branch_logits),
                             labels, epoch, temperature, rampup)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(terms["loss"]), expected, rtol=1e-5)


@pytest.mark.parametrize("epoch,expected", [
    (0, np.exp(-5.0)), (40, np.exp(-5 * 0.25)), (80, 1.0), (120, 1.0), (1000, 1.0)])
def test_rampup_weight(epoch, expected):
  np.testing.assert_allclose(float(losses.kl_weight(epoch, 80)), expected, rtol=1e-6)
  assert float(losses.kl_weight(epoch, 0)) == 1.0


def test_kl_zero_when_branches_equal_ensemble_and_positive_otherwise():
  logits = jax.random.normal(jax.random.key(0), (8, 10))
  same = _output(jnp.stack([logits] * 3))
  labels = jnp.zeros(8, jnp.int32)
  _, exact = losses.one_loss(same, labels, epoch=100, teacher_eps=0.0)
  assert abs(float(exact["kl"])) < 1e-6
  _, reference = losses.one_loss(same, labels, epoch=100)  # the +1e-7 leaves ~C * 1e-7
  assert abs(float(reference["kl"])) < 1e-4
  different = _output(jax.random.normal(jax.random.key(1), (3, 8, 10)))
  _, terms = losses.one_loss(different, labels, epoch=100)
  assert float(terms["kl"]) > 1e-3


def _kl_only(branch_logits, gate, labels, stop_gradient):
  out = _output(branch_logits, gate)
  _, terms = losses.one_loss(out, labels, epoch=100, stop_gradient=stop_gradient)
  return terms["kl"]


def test_stop_gradient_blocks_teacher_gradient():
  z = jax.random.normal(jax.random.key(0), (3, 8, 10))
  gate = jax.nn.softmax(jax.random.normal(jax.random.key(1), (8, 3)))
  labels = jnp.zeros(8, jnp.int32)

  def kl_through_ensemble(ensemble, stop_gradient):
    out = models.OneOutput(branch_logits=z, gate=gate, ensemble_logits=ensemble)
    return losses.one_loss(out, labels, epoch=100, stop_gradient=stop_gradient)[1]["kl"]

  ensemble = jnp.einsum("nb,bnc->nc", gate, z)
  g_stop = jax.grad(kl_through_ensemble)(ensemble, True)
  np.testing.assert_array_equal(g_stop, 0.0)
  g_free = jax.grad(kl_through_ensemble)(ensemble, False)
  assert float(jnp.abs(g_free).max()) > 0
  # Through the gate: with stop-gradient the KL term sends nothing to the gate.
  g_gate = jax.grad(lambda g: _kl_only(z, g, labels, True))(gate)
  np.testing.assert_array_equal(g_gate, 0.0)


def test_options():
  z = jax.random.normal(jax.random.key(0), (2, 8, 10))
  out = _output(z)
  labels = jnp.arange(8) % 10
  full, t = losses.one_loss(out, labels, epoch=100)
  no_ens, _ = losses.one_loss(out, labels, epoch=100, ensemble_ce=False)
  np.testing.assert_allclose(float(full - no_ens), float(t["ce_ensemble"]), rtol=1e-5)
  no_kl, t0 = losses.one_loss(out, labels, epoch=100, kl_scale=0.0)
  np.testing.assert_allclose(float(no_kl), float(t0["ce_branches"] + t0["ce_ensemble"]),
                             rtol=1e-6)
  masked, tm = losses.one_loss(out, labels, epoch=100, active_branches=(True, False))
  assert "ce_branch_1" not in tm
  np.testing.assert_allclose(float(tm["ce_branches"]), float(t["ce_branch_0"]), rtol=1e-6)


def test_padding_weights_ignore_padded_examples():
  z = jax.random.normal(jax.random.key(0), (2, 8, 10))
  labels = jnp.arange(8) % 10
  full, _ = losses.one_loss(_output(z[:, :5]), labels[:5], epoch=10)
  weights = jnp.array([1, 1, 1, 1, 1, 0, 0, 0], jnp.float32)
  padded, _ = losses.one_loss(_output(z), labels, epoch=10, weights=weights)
  np.testing.assert_allclose(float(full), float(padded), rtol=1e-5)


def test_baseline_loss_is_cross_entropy():
  logits = jax.random.normal(jax.random.key(0), (8, 10))
  labels = jnp.arange(8)
  loss, terms = losses.baseline_loss(logits, labels)
  expected = -np.mean(np.log(_numpy_softmax(np.asarray(logits, np.float64))[np.arange(8), labels]))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  chex.assert_trees_all_close(terms["ce"], loss)
