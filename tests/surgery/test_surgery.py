"""Surgery: expand, merge, transplant, extract, the Orbax layer and the command line.

Tiny models (ResNet-8, 3 classes, 8x8 images) with random non-trivial variables and a random
momentum trace, so that "the output is unchanged" and "momentum follows" are real checks.
"""
import contextlib
import hashlib
import io
import os
import subprocess
import sys
import types

import chex
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from one_jax import surgery
from one_jax.architectures import model_spec, models
from one_jax.storage import checkpoints
from one_jax.surgery import __main__ as surgery_cli

DEPTH, CLASSES = 8, 3
IMAGES = np.random.RandomState(0).normal(size=(6, 8, 8, 3)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Sources.


def one_info(num_branches, depth=DEPTH, classes=CLASSES):
  return model_spec.ModelSpec("one_resnet", depth, classes, num_branches).to_dict()


def baseline_info(depth=DEPTH, classes=CLASSES):
  return model_spec.ModelSpec("cifar_resnet", depth, classes).to_dict()


def random_state(info, seed, *, opt=True):
  """Random variables of the right shapes (positive BN variances) and a random momentum."""
  shapes = model_spec.ModelSpec.from_dict(info).abstract_variables((8, 8, 3))
  rng = np.random.RandomState(seed)

  def leaf(path, s):
    name = jax.tree_util.keystr(path)
    if "var" in name:
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    if "scale" in name:
      return rng.uniform(0.8, 1.2, s.shape).astype(np.float32)
    return (0.3 * rng.normal(size=s.shape)).astype(np.float32)

  state = {k: jax.tree_util.tree_map_with_path(leaf, v) for k, v in shapes.items()}
  if opt:
    opt_state = flax.serialization.to_state_dict(optax.sgd(0.1, 0.9).init(state["params"]))
    state["opt_state"] = jax.tree.map(
        lambda x: rng.normal(size=np.shape(x)).astype(np.float32), opt_state)
  state["step"] = np.asarray(100 + seed, np.int64)
  return state


def trace(state):
  return state["opt_state"]["0"]["trace"]


_APPLY = {}


def apply(info, state, images=IMAGES):
  """Eval-mode outputs; one jitted apply per architecture."""
  key = tuple(sorted(info.items()))
  if key not in _APPLY:
    model = model_spec.ModelSpec.from_dict(info).build()
    _APPLY[key] = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return _APPLY[key](models.variables_in(state), images)


def slice_branch(tree, b):
  return jax.tree.map(lambda x: x[b], tree)


@pytest.fixture(scope="module")
def one2():
  return random_state(one_info(2), 1), one_info(2)


@pytest.fixture(scope="module")
def base():
  return random_state(baseline_info(), 2), baseline_info()


@pytest.fixture(scope="module")
def one1():
  return random_state(one_info(1), 3), one_info(1)


def snapshot(tree):
  return jax.tree.map(np.array, tree)


# ---------------------------------------------------------------------------------------------
# expand.


@pytest.mark.parametrize("sources", [None, [0, 0]])
def test_expand_copy_keeps_the_ensemble_output(one2, sources):
  state, info = one2
  before = snapshot(state)
  new, new_info = surgery.expand(state, info, 4, sources=sources)
  chex.assert_trees_all_equal(state, before)  # inputs are not modified
  assert new_info == one_info(4)
  origin = [0, 1] + (sources or [0, 1])
  out, old = apply(new_info, new), apply(info, state)
  chex.assert_trees_all_close(out.ensemble_logits, old.ensemble_logits, atol=1e-5, rtol=1e-5)
  for slot, b in enumerate(origin):
    chex.assert_trees_all_equal(slice_branch(new["params"]["branches"], slot),
                                slice_branch(state["params"]["branches"], b))
    chex.assert_trees_all_equal(slice_branch(new["batch_stats"]["branches"], slot),
                                slice_branch(state["batch_stats"]["branches"], b))
    chex.assert_trees_all_equal(slice_branch(trace(new)["branches"], slot),
                                slice_branch(trace(state)["branches"], b))
    chex.assert_trees_all_equal(new["params"]["gate"]["dense"]["kernel"][:, slot],
                                state["params"]["gate"]["dense"]["kernel"][:, b])
    chex.assert_trees_all_equal(trace(new)["gate"]["dense"]["kernel"][:, slot],
                                trace(state)["gate"]["dense"]["kernel"][:, b])
    chex.assert_trees_all_close(out.branch_logits[slot], old.branch_logits[b], atol=1e-6)
  uses = {b: origin.count(b) for b in origin}
  chex.assert_trees_all_close(
      new["gate_offset"]["log_weight"],
      np.asarray([state["gate_offset"]["log_weight"][b] - np.log(uses[b]) for b in origin]))
  chex.assert_trees_all_equal(new["params"]["trunk"], state["params"]["trunk"])
  chex.assert_trees_all_equal(trace(new)["trunk"], trace(state)["trunk"])
  assert int(new["step"]) == int(state["step"])


def test_expand_fresh_keeps_old_branches(one2):
  state, info = one2
  new, new_info = surgery.expand(state, info, 3, mode="fresh", rng=jax.random.PRNGKey(7))
  out, old = apply(new_info, new), apply(info, state)
  chex.assert_trees_all_close(out.branch_logits[:2], old.branch_logits, atol=1e-6)
  chex.assert_trees_all_equal(slice_branch(trace(new)["branches"], 0),
                              slice_branch(trace(state)["branches"], 0))
  chex.assert_trees_all_equal(slice_branch(trace(new)["branches"], 2),
                              jax.tree.map(np.zeros_like, slice_branch(trace(state)["branches"], 0)))
  gate = new["params"]["gate"]
  chex.assert_trees_all_equal(gate["dense"]["kernel"][:, 2], np.zeros(32, np.float32))
  assert gate["dense"]["bias"][2] == 0 and gate["bn"]["scale"][2] == 1
  assert new["batch_stats"]["gate"]["bn"]["var"][2] == 1
  chex.assert_trees_all_equal(gate["dense"]["kernel"][:, :2], state["params"]["gate"]["dense"]["kernel"])
  assert new["gate_offset"]["log_weight"][2] == 0
  # The new slot is a fresh initialisation (BatchNorm at its initial statistics), not a copy.
  new_conv = new["params"]["branches"]["layer3_0"]["conv1"]["kernel"]
  assert not np.allclose(new_conv[2], new_conv[0]) and np.all(
      new["batch_stats"]["branches"]["layer3_0"]["bn1"]["var"][2] == 1)


def test_expand_baseline_copies_keep_its_output(base):
  state, info = base
  new, new_info = surgery.expand(state, info, 3)
  out = apply(new_info, new)
  chex.assert_trees_all_close(out.ensemble_logits, apply(info, state), atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(out.gate, np.full((len(IMAGES), 3), 1 / 3), atol=1e-6)
  chex.assert_trees_all_equal(slice_branch(trace(new)["branches"], 2), trace(state)["branch"])
  chex.assert_trees_all_equal(trace(new)["gate"]["dense"]["kernel"], np.zeros((32, 3), np.float32))


def test_fresh_gate_init_gives_trainable_random_columns(base, one2):
  state, info = base
  new, new_info = surgery.expand(state, info, 3, fresh_gate="init", rng=3)
  kernel = new["params"]["gate"]["dense"]["kernel"]
  assert np.all(kernel != 0) and np.all(kernel == kernel[:, :1])  # equal columns: output kept
  chex.assert_trees_all_close(apply(new_info, new).ensemble_logits, apply(info, state),
                              atol=1e-5, rtol=1e-5)
  merged, _ = surgery.merge([state, one2[0], state], [info, one2[1], info], fresh_gate="init")
  kernel = merged["params"]["gate"]["dense"]["kernel"]
  fresh = surgery.expand(state, info, 4, mode="fresh", fresh_gate="init")[0]
  chex.assert_trees_all_equal(kernel[:, 3], fresh["params"]["gate"]["dense"]["kernel"][:, 3])
  chex.assert_trees_all_equal(kernel[:, 1:3], one2[0]["params"]["gate"]["dense"]["kernel"])
  assert np.all(kernel[:, 0] != 0) and not np.allclose(kernel[:, 0], kernel[:, 3])
  assert merged["params"]["gate"]["bn"]["scale"][0] == 1
  chex.assert_trees_all_equal(trace(merged)["gate"]["dense"]["kernel"][:, 0],
                              np.zeros(32, np.float32))


def test_reset_optimizer_leaves_the_optimizer_out(one2):
  state, info = one2
  new, _ = surgery.expand(state, info, 3, reset_optimizer=True)
  assert "opt_state" not in new
  new, _ = surgery.extract(state, info, branch=0, reset_optimizer=True)
  assert "opt_state" not in new


def test_expand_without_optimizer_state(one2):
  state, info = one2
  state = {k: v for k, v in state.items() if k != "opt_state"}
  new, _ = surgery.expand(state, info, 3)
  assert "opt_state" not in new


# ---------------------------------------------------------------------------------------------
# Reduced optimizer leaves (per-module learning-rate factors: [B] under 'branches').


def ratio_like_state(state):
  """An optimizer state like the gradient-ratio chain: params-shaped factors with a [B] per
  branch leaf and [] elsewhere, beside a momentum trace."""
  params = state["params"]
  rng = np.random.RandomState(5)

  def factor(path, x):
    branch = "branches" in jax.tree_util.keystr(path)
    return rng.uniform(0.5, 2.0, (x.shape[0],) if branch else ()).astype(np.float32)

  return dict(state, opt_state={
      "0": {"count": np.asarray(3, np.int32),
            "factors": jax.tree_util.tree_map_with_path(factor, params),
            "inner_state": {"0": {}, "1": {"trace": trace(state)}}},
      "1": {"count": np.asarray(3, np.int32)}})


def test_reduced_leaves_follow_their_branch(one2):
  state, info = ratio_like_state(one2[0]), one2[1]
  factors = state["opt_state"]["0"]["factors"]
  new, _ = surgery.expand(state, info, 3, sources=[1])
  new_factors = new["opt_state"]["0"]["factors"]
  chex.assert_trees_all_equal(jax.tree.map(lambda x: x[2], new_factors["branches"]),
                              jax.tree.map(lambda x: x[1], factors["branches"]))
  chex.assert_trees_all_equal(new_factors["gate"], factors["gate"])  # scalars: kept whole
  chex.assert_trees_all_equal(new_factors["trunk"], factors["trunk"])
  assert new["opt_state"]["0"]["inner_state"]["0"] == {}
  chex.assert_trees_all_equal(slice_branch(new["opt_state"]["0"]["inner_state"]["1"]["trace"]
                                           ["branches"], 2),
                              slice_branch(trace(one2[0])["branches"], 1))

  fresh, _ = surgery.expand(state, info, 3, mode="fresh")
  fresh_factors = fresh["opt_state"]["0"]["factors"]["branches"]
  values = np.concatenate([np.ravel(x) for x in jax.tree.leaves(factors)])
  for leaf in jax.tree.leaves(fresh_factors):
    assert leaf.shape == (3,) and np.isclose(leaf[2], values.mean())  # neutral, not zero

  base, _ = surgery.extract(state, info, branch=1)
  chex.assert_trees_all_equal(base["opt_state"]["0"]["factors"]["branch"],
                              jax.tree.map(lambda x: x[1], factors["branches"]))


def test_merge_refuses_different_optimizers_unless_reset(one2, base):
  mixed = [ratio_like_state(one2[0]), base[0]]
  with pytest.raises(surgery.SurgeryError, match="optimizer states .* differ.*reset_optimizer"):
    surgery.merge(mixed, [one2[1], base[1]])
  new, _ = surgery.merge(mixed, [one2[1], base[1]], reset_optimizer=True)
  assert "opt_state" not in new


# ---------------------------------------------------------------------------------------------
# merge.


def test_merge_baseline_and_one_models(base, one2, one1):
  states, infos = [base[0], one2[0], one1[0]], [base[1], one2[1], one1[1]]
  before = snapshot(states)
  for trunk_from in (0, 1):
    new, new_info = surgery.merge(states, infos, trunk_from=trunk_from)
    chex.assert_trees_all_equal(states, before)
    assert new_info == one_info(4)
    origin = [(0, None), (1, 0), (1, 1), (2, 0)]
    for slot, (s, b) in enumerate(origin):
      src_params = states[s]["params"]
      want = src_params["branch"] if b is None else slice_branch(src_params["branches"], b)
      chex.assert_trees_all_equal(slice_branch(new["params"]["branches"], slot), want)
      src_trace = trace(states[s])
      want = src_trace["branch"] if b is None else slice_branch(src_trace["branches"], b)
      chex.assert_trees_all_equal(slice_branch(trace(new)["branches"], slot), want)
    chex.assert_trees_all_equal(new["params"]["trunk"], states[trunk_from]["params"]["trunk"])
    chex.assert_trees_all_equal(trace(new)["trunk"], trace(states[trunk_from])["trunk"])
    assert int(new["step"]) == int(states[trunk_from]["step"])
    out = apply(new_info, new)
    if trunk_from == 0:  # the baseline's slot reproduces the baseline
      chex.assert_trees_all_close(out.branch_logits[0], apply(base[1], base[0]), atol=1e-5)
    else:  # the ONE model's slots reproduce its branches
      chex.assert_trees_all_close(out.branch_logits[1:3], apply(one2[1], one2[0]).branch_logits,
                                  atol=1e-5)
  # Gate columns: fresh for the baseline, from the source where it has a gate.
  kernel = new["params"]["gate"]["dense"]["kernel"]
  chex.assert_trees_all_equal(kernel[:, 0], np.zeros(32, np.float32))
  chex.assert_trees_all_equal(kernel[:, 1:3], one2[0]["params"]["gate"]["dense"]["kernel"])
  chex.assert_trees_all_equal(kernel[:, 3], one1[0]["params"]["gate"]["dense"]["kernel"][:, 0])
  chex.assert_trees_all_equal(new["batch_stats"]["gate"]["bn"]["var"][1:3],
                              one2[0]["batch_stats"]["gate"]["bn"]["var"])
  assert new["batch_stats"]["gate"]["bn"]["var"][0] == 1 and new["params"]["gate"]["bn"]["scale"][0] == 1
  chex.assert_trees_all_equal(new["gate_offset"]["log_weight"][1:3], one2[0]["gate_offset"]["log_weight"])
  chex.assert_trees_all_equal(trace(new)["gate"]["dense"]["kernel"][:, 0], np.zeros(32, np.float32))
  chex.assert_trees_all_equal(trace(new)["gate"]["dense"]["kernel"][:, 1:3],
                              trace(one2[0])["gate"]["dense"]["kernel"])


def test_merge_slots_and_mean_trunk(base, one1):
  states, infos = [base[0], one1[0]], [base[1], one1[1]]
  new, _ = surgery.merge(states, infos, slots=[1, 0], trunk_from="mean")
  chex.assert_trees_all_equal(slice_branch(new["params"]["branches"], 1), base[0]["params"]["branch"])
  chex.assert_trees_all_equal(slice_branch(new["params"]["branches"], 0),
                              slice_branch(one1[0]["params"]["branches"], 0))
  chex.assert_trees_all_close(new["params"]["trunk"], jax.tree.map(
      lambda a, b: (a + b) / 2, base[0]["params"]["trunk"], one1[0]["params"]["trunk"]))
  chex.assert_trees_all_close(trace(new)["trunk"], jax.tree.map(
      lambda a, b: (a + b) / 2, trace(base[0])["trunk"], trace(one1[0])["trunk"]))


def test_merge_zero_momentum_where_a_source_has_none(base, one1):
  no_opt = {k: v for k, v in base[0].items() if k != "opt_state"}
  new, _ = surgery.merge([no_opt, one1[0]], [base[1], one1[1]], trunk_from=1)
  chex.assert_trees_all_equal(slice_branch(trace(new)["branches"], 0), jax.tree.map(
      np.zeros_like, base[0]["params"]["branch"]))
  chex.assert_trees_all_equal(slice_branch(trace(new)["branches"], 1),
                              slice_branch(trace(one1[0])["branches"], 0))


# ---------------------------------------------------------------------------------------------
# extract, transplant.


def test_extract_gives_the_branch_as_a_resnet(one2):
  state, info = one2
  new, new_info = surgery.extract(state, info, branch=1)
  assert new_info == baseline_info() and set(new["params"]) == {"trunk", "branch"}
  assert "gate_offset" not in new and set(trace(new)) == {"trunk", "branch"}
  chex.assert_trees_all_close(apply(new_info, new), apply(info, state).branch_logits[1], atol=1e-5)
  chex.assert_trees_all_equal(trace(new)["branch"], slice_branch(trace(state)["branches"], 1))
  chex.assert_trees_all_equal(new["batch_stats"]["branch"],
                              slice_branch(state["batch_stats"]["branches"], 1))


def test_transplant_changes_only_the_slot(one2, base):
  state, info = one2
  new, new_info = surgery.transplant(state, info, base[0], base[1], branch=0, slot=1)
  assert new_info == info
  chex.assert_trees_all_equal(slice_branch(new["params"]["branches"], 1), base[0]["params"]["branch"])
  chex.assert_trees_all_equal(slice_branch(trace(new)["branches"], 1), trace(base[0])["branch"])
  chex.assert_trees_all_equal(slice_branch(new["batch_stats"]["branches"], 1),
                              base[0]["batch_stats"]["branch"])
  chex.assert_trees_all_equal(slice_branch(new["params"]["branches"], 0),
                              slice_branch(state["params"]["branches"], 0))
  chex.assert_trees_all_equal(slice_branch(trace(new)["branches"], 0),
                              slice_branch(trace(state)["branches"], 0))
  for part in ("trunk", "gate"):
    chex.assert_trees_all_equal(new["params"][part], state["params"][part])
    chex.assert_trees_all_equal(new["batch_stats"][part], state["batch_stats"][part])
    chex.assert_trees_all_equal(trace(new)[part], trace(state)[part])
  chex.assert_trees_all_equal(new["gate_offset"], state["gate_offset"])
  chex.assert_trees_all_equal(new["opt_state"]["1"], state["opt_state"]["1"])


# ---------------------------------------------------------------------------------------------
# Validation (pure functions).


@pytest.mark.parametrize("call, match", [
    (lambda s, i, b, bi: surgery.expand(s, i, 1), "fewer than the model's 2 branches"),
    (lambda s, i, b, bi: surgery.expand(s, i, 3, sources=[2]), "--from=2 is out of range"),
    (lambda s, i, b, bi: surgery.expand(s, i, 4, sources=[0]), "lists 1 branches"),
    (lambda s, i, b, bi: surgery.expand(s, i, 3, mode="fresh", sources=[0]), "--from"),
    (lambda s, i, b, bi: surgery.expand(s, i, 3, mode="grow"), "--mode='grow'"),
    (lambda s, i, b, bi: surgery.merge([b], [bi], fresh_gate="random"), "--fresh_gate='random'"),
    (lambda s, i, b, bi: surgery.extract(b, bi, branch=0), "already a single-branch baseline"),
    (lambda s, i, b, bi: surgery.extract(s, i, branch=2), "--branch=2 is out of range"),
    (lambda s, i, b, bi: surgery.extract(s, i, branch=-1), "--branch=-1 is out of range"),
    (lambda s, i, b, bi: surgery.transplant(s, i, b, bi, branch=1, slot=0), "--branch=1"),
    (lambda s, i, b, bi: surgery.transplant(s, i, b, bi, branch=0, slot=2), "--slot=2"),
    (lambda s, i, b, bi: surgery.transplant(b, bi, s, i, branch=0, slot=0), "is a baseline"),
    (lambda s, i, b, bi: surgery.merge([s, b], [i, bi], trunk_from=2), "--trunk_from=2"),
    (lambda s, i, b, bi: surgery.merge([s, b], [i, bi], slots=[0, 0, 1]), "--slots=0,0,1"),
    (lambda s, i, b, bi: surgery.merge([s, b], [i, dict(bi, num_classes=5)]), "class count"),
    (lambda s, i, b, bi: surgery.merge([s, b], [i, dict(bi, depth=14)]), "depth 14"),
    (lambda s, i, b, bi: surgery.extract(s, dict(i, block="bottleneck"), branch=0),
     "claims bottleneck blocks at depth 8"),
    (lambda s, i, b, bi: surgery.extract(s, dict(i, num_branches=3), branch=0),
     "do not match its model info"),
])
def test_bad_requests_raise_one_line(one2, base, call, match):
  before = snapshot([one2[0], base[0]])
  with pytest.raises(surgery.SurgeryError, match=match) as e:
    call(one2[0], one2[1], base[0], base[1])
  assert "\n" not in str(e.value)
  chex.assert_trees_all_equal([one2[0], base[0]], before)


def test_mismatched_depth_is_found_from_the_arrays(one2):
  """A real depth-14 model against a depth-8 one: the message names depth, not a shape."""
  other = random_state(one_info(2, depth=14), 9, opt=False)
  with pytest.raises(surgery.SurgeryError, match="has depth 14 but the destination .* has 8"):
    surgery.transplant(one2[0], one2[1], other, one_info(2, depth=14), branch=0, slot=0)


# ---------------------------------------------------------------------------------------------
# Orbax layer and command line.


def save(path, state, info, epoch=7):
  return checkpoints.save_standalone(str(path), state, {"model": info, "epoch": epoch})


def tree_hash(root):
  """Names and contents of every file under root: sources must come out untouched."""
  digest = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      with open(p, "rb") as fh:
        digest[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
  return digest


def run_main(argv):
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = surgery_cli.main(argv)
  return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, one2, base, one1):
  root = tmp_path_factory.mktemp("ckpts")
  paths = {"one2": save(root / "one2", *one2), "base": save(root / "base", *base),
           "one1": save(root / "one1", *one1),
           "deep": save(root / "deep", random_state(baseline_info(depth=14), 4, opt=False),
                        baseline_info(depth=14)),
           "wide": save(root / "wide", random_state(baseline_info(classes=5), 5, opt=False),
                        baseline_info(classes=5))}
  corrupt = root / "corrupt" / "3"
  os.makedirs(corrupt / "state")
  os.makedirs(corrupt / "meta")
  (corrupt / "state" / "_METADATA").write_text("not a checkpoint")
  paths["corrupt"] = str(root / "corrupt")
  paths["out"] = str(tmp_path_factory.mktemp("out"))
  return paths


def test_cli_expand_writes_a_loadable_trainable_checkpoint(ckpts, one2):
  before = tree_hash(ckpts["one2"])
  dst = os.path.join(ckpts["out"], "expanded")
  rc, out, err = run_main(["expand", f"--src={ckpts['one2']}", f"--dst={dst}", "--branches=3",
                           "--from=1"])
  assert rc == 0, err
  assert "branches" in out and tree_hash(ckpts["one2"]) == before
  model, variables = checkpoints.load_model(dst)
  assert model.num_branches == 3
  want, _ = surgery.expand(*one2, 3, sources=[1])
  chex.assert_trees_all_close(variables, models.variables_in(want))
  state, meta = checkpoints.restore_raw(dst)
  assert meta["epoch"] == 7 and meta["step"] == int(one2[0]["step"])
  assert meta["model"] == one_info(3)
  assert meta["surgery"]["operation"] == "expand" and meta["surgery"]["from"] == [1]
  assert meta["surgery"]["sources"][0]["path"] == ckpts["one2"]
  # The trainer restores the optimizer state onto its own optimizer's structure and steps.
  tx = optax.sgd(0.1, 0.9)
  opt_state = flax.serialization.from_state_dict(tx.init(state["params"]), state["opt_state"])
  chex.assert_trees_all_equal(opt_state[0].trace, want["opt_state"]["0"]["trace"])
  grads = jax.tree.map(jnp.ones_like, state["params"])
  tx.update(grads, opt_state, state["params"])


def test_cli_merge_transplant_extract(ckpts, one2, base, one1):
  hashes = {k: tree_hash(ckpts[k]) for k in ("one2", "base", "one1")}
  merged = os.path.join(ckpts["out"], "merged")
  rc, _, err = run_main(["merge", f"--src={ckpts['base']}", f"--src={ckpts['one1']}",
                         f"--dst={merged}", "--trunk_from=mean", "--slots=1,0"])
  assert rc == 0, err
  state, meta = checkpoints.restore_raw(merged)
  want, _ = surgery.merge([base[0], one1[0]], [base[1], one1[1]], slots=[1, 0], trunk_from="mean")
  chex.assert_trees_all_close(state["params"], want["params"])
  assert meta["model"] == one_info(2) and len(meta["surgery"]["sources"]) == 2

  moved = os.path.join(ckpts["out"], "transplanted")
  rc, _, err = run_main(["transplant", f"--src={ckpts['one1']}", "--branch=0",
                         f"--into={ckpts['one2']}", "--slot=1", f"--dst={moved}"])
  assert rc == 0, err
  state, meta = checkpoints.restore_raw(moved)
  chex.assert_trees_all_close(slice_branch(state["params"]["branches"], 1),
                              slice_branch(one1[0]["params"]["branches"], 0))
  assert meta["step"] == int(one2[0]["step"])

  student = os.path.join(ckpts["out"], "student")
  rc, _, err = run_main(["extract", f"--src={ckpts['one2']}", "--branch=0", f"--dst={student}",
                         "--reset_optimizer"])
  assert rc == 0, err
  model, variables = checkpoints.load_model(student)
  assert isinstance(model, models.Baseline)
  state, _ = checkpoints.restore_raw(student)
  assert "opt_state" not in state
  chex.assert_trees_all_close(apply(baseline_info(), variables),
                              apply(one2[1], one2[0]).branch_logits[0], atol=1e-5)
  assert {k: tree_hash(ckpts[k]) for k in hashes} == hashes


def test_cli_inspect(ckpts):
  rc, out, err = run_main(["inspect", ckpts["one2"]])
  assert rc == 0, err
  state, _ = checkpoints.restore_raw(ckpts["one2"])
  counts = surgery.parameter_counts(state, one_info(2))
  assert "depth 8" in out and "basic blocks" in out and "2 branches" in out and "3 classes" in out
  assert "step:       101" in out and "epoch:      7" in out
  for part in ("trunk", "branch 0", "branch 1", "gate", "total"):
    assert part in out and f"{counts[part]:,}" in out
  assert counts["total"] == models.count_params(state["params"])
  assert "optimizer state: present" in out
  rc, out, _ = run_main(["inspect", ckpts["deep"]])
  assert rc == 0 and "optimizer state: absent" in out and "branch " in out


@pytest.mark.parametrize("argv", [
    ["expand", "--src={one2}", "--dst={dst}", "--branches=1"],                 # n < m
    ["expand", "--src={one2}", "--dst={dst}", "--branches=3", "--from=4"],      # out of range
    ["expand", "--src={one2}", "--dst={dst}", "--branches=three"],              # not a number
    ["merge", "--src={one2}", "--src={deep}", "--dst={dst}"],                   # depth
    ["merge", "--src={base}", "--src={wide}", "--dst={dst}"],                   # classes
    ["merge", "--src={one2}", "--src={base}", "--dst={dst}", "--trunk_from=5"],
    ["transplant", "--src={base}", "--branch=0", "--into={one2}", "--slot=2", "--dst={dst}"],
    ["transplant", "--src={one2}", "--branch=2", "--into={one2}", "--slot=0", "--dst={dst}"],
    ["extract", "--src={base}", "--branch=0", "--dst={dst}"],                   # wrong kind
    ["extract", "--src={one2}", "--branch=5", "--dst={dst}"],
    ["extract", "--src={missing}", "--branch=0", "--dst={dst}"],                # missing source
    ["extract", "--src={corrupt}", "--branch=0", "--dst={dst}"],                # unreadable
    ["extract", "--src={one2}", "--branch=0", "--dst={one1}"],                  # existing dst
    ["extract", "--src={one2}", "--branch=0", "--dst={missing}/x"],             # no parent
    ["extract", "--src={one2}", "--dst={dst}"],                                 # usage
    ["inspect", "{missing}"],
])
def test_cli_errors_write_nothing(ckpts, argv):
  names = ("one2", "base", "one1", "deep", "wide", "corrupt")
  hashes = {k: tree_hash(ckpts[k]) for k in names}
  dst = os.path.join(ckpts["out"], "never")
  paths = dict(ckpts, dst=dst, missing=os.path.join(ckpts["out"], "missing"))
  rc, out, err = run_main([a.format(**paths) for a in argv])
  assert rc == 1
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert not os.path.exists(dst)
  assert not [f for f in os.listdir(ckpts["out"]) if ".tmp-" in f or f == "missing"]
  assert {k: tree_hash(ckpts[k]) for k in names} == hashes


def test_cli_process_exit_code_and_one_line(ckpts, repo_root):
  dst = os.path.join(ckpts["out"], "never")
  proc = subprocess.run(
      [sys.executable, "-m", "one_jax.surgery", "merge", f"--src={ckpts['one2']}",
       f"--src={ckpts['deep']}", f"--dst={dst}"],
      cwd=repo_root, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.startswith("error: merge: source 1 has depth 14") and proc.stderr.count("\n") == 1, proc.stderr
  assert not os.path.exists(dst)


# ---------------------------------------------------------------------------------------------
# The trainer's own optimizer: outputs restore onto its structure and step.


def trainer_optimizer(params, geo_lr):
  from one_jax.training import optimizer
  config = types.SimpleNamespace(lr=0.1, schedule="multistep", num_epochs=2, milestones=(1,),
                                 gamma=0.1, geo_lr=geo_lr)
  return optimizer.create_optimizer(config, 4, params)


def with_trainer_optimizer(state, geo_lr, seed):
  """The state with its trainer optimizer's state dict, every float leaf random."""
  tx = trainer_optimizer(state["params"], geo_lr)
  rng = np.random.RandomState(seed)
  opt_state = jax.tree.map(
      lambda s: rng.uniform(0.5, 2, s.shape).astype(s.dtype) if s.dtype == np.float32
      else np.zeros(s.shape, s.dtype),
      flax.serialization.to_state_dict(jax.eval_shape(tx.init, state["params"])))
  return dict(state, opt_state=opt_state)


@pytest.mark.parametrize("geo_lr", [0, 1])
def test_outputs_restore_onto_the_trainers_optimizer(one2, base, geo_lr):
  one = with_trainer_optimizer(one2[0], geo_lr, 0)
  baseline = with_trainer_optimizer(base[0], geo_lr, 1)
  outputs = [surgery.expand(one, one2[1], 3, mode="fresh"),
             surgery.merge([baseline, one], [base[1], one2[1]]),
             surgery.merge([baseline, baseline], [base[1], base[1]]),
             surgery.extract(one, one2[1], branch=1)]
  for state, info in outputs:
    tx = trainer_optimizer(state["params"], geo_lr)
    target = jax.eval_shape(tx.init, state["params"])
    fresh = flax.serialization.to_state_dict(target)
    assert jax.tree.structure(state["opt_state"]) == jax.tree.structure(fresh)
    chex.assert_trees_all_equal_shapes(state["opt_state"], fresh)
    flax.serialization.from_state_dict(target, state["opt_state"])
  if geo_lr:  # and it steps
    state = outputs[1][0]
    tx, params = trainer_optimizer(state["params"], geo_lr), state["params"]
    opt_state = flax.serialization.from_state_dict(tx.init(params), state["opt_state"])
    jax.jit(tx.update)(jax.tree.map(np.ones_like, params), opt_state, params)
  if geo_lr:  # two baselines: the invented gate factors are the trunk source's mean factor
    factors = outputs[2][0]["opt_state"]["0"]["factors"]
    base_factors = baseline["opt_state"]["0"]["factors"]
    mean = np.mean(np.concatenate([np.ravel(x) for x in jax.tree.leaves(base_factors)]))
    for leaf in jax.tree.leaves(factors["gate"]):
      assert leaf.shape == () and np.isclose(leaf, mean)
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x[1], factors["branches"]),
                                base_factors["branch"])
