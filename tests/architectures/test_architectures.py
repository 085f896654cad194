"""The architecture families (one_jax/architectures): parameter counts from the published
definitions, forward shapes, the gated ensemble, and surgery on every family."""
import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from one_jax import surgery
from one_jax.architectures import model_spec, models
from one_jax.interop import reference, torch_common
from one_jax.storage import checkpoints
from one_jax.training import train, voting

from configs import paper

S = model_spec.ModelSpec


# ----------------------------------------------------------------------------- counts
# Each published network counted from its definition, layer by layer: conv(i, o, k) = k*k*i*o
# weights (bias-free, but VGG's convolutions carry o biases), BatchNorm(c) = 2c (scale, bias),
# the classifier fc(c, C) = c*C + C. Returns (trunk, branch, F): the trunk's parameters, one
# branch's (last stage or block + classifier) and the channels F the trunk hands the gate.

def conv(i, o, k, groups=1):
  return k * k * (i // groups) * o


def bn(c):
  return 2 * c


def fc(c, classes):
  return c * classes + classes


def wrn_counts(depth, k, classes):
  """Zagoruyko & Komodakis: stem conv3x3 3->16; groups of n = (depth-4)/6 pre-activation blocks
  (BN-conv3x3-BN-conv3x3, a 1x1 projection where width or stride change) of widths 16k, 32k,
  64k; final BN and fc."""
  n = (depth - 4) // 6

  def group(c_in, c_out):
    first = bn(c_in) + conv(c_in, c_out, 3) + bn(c_out) + conv(c_out, c_out, 3)
    first += conv(c_in, c_out, 1) if c_in != c_out or c_in != 16 else 0  # groups 2, 3 stride 2
    return first + (n - 1) * (2 * bn(c_out) + 2 * conv(c_out, c_out, 3))

  trunk = conv(3, 16, 3) + group(16, 16 * k) + group(16 * k, 32 * k)
  return trunk, group(32 * k, 64 * k) + bn(64 * k) + fc(64 * k, classes), 32 * k


def vgg16_counts(width, classes):
  """VGG-16 (configuration D) with BN: blocks of 2, 2, 3, 3, 3 conv3x3(+bias)-BN of widths
  w, 2w, 4w, 8w, 8w (w = 64); fc on the 8w channels of block 5."""
  def block(c_in, c_out, convs):
    return sum(conv(c, c_out, 3) + c_out + bn(c_out) for c in [c_in] + [c_out] * (convs - 1))

  w = width
  trunk = block(3, w, 2) + block(w, 2 * w, 2) + block(2 * w, 4 * w, 3) + block(4 * w, 8 * w, 3)
  return trunk, block(8 * w, 8 * w, 3) + fc(8 * w, classes), 8 * w


def densenet_counts(depth, k, bottleneck, classes):
  """Huang et al. (CIFAR): BC layers BN-conv1x1(4k)-BN-conv3x3(k), n = (L-4)/6 per block, stem
  2k, transitions BN-conv1x1 halving the channels; plain layers BN-conv3x3(k), n = (L-4)/3,
  stem 16, transitions keeping them; final BN and fc."""
  n = (depth - 4) // (6 if bottleneck else 3)

  def block(c):
    total = 0
    for _ in range(n):
      total += (bn(c) + conv(c, 4 * k, 1) + bn(4 * k) + conv(4 * k, k, 3) if bottleneck
                else bn(c) + conv(c, k, 3))
      c += k
    return total, c

  c = 2 * k if bottleneck else 16
  trunk = conv(3, c, 3)
  for _ in range(2):
    params, c = block(c)
    out = c // 2 if bottleneck else c
    trunk += params + bn(c) + conv(c, out, 1)
    c = out
  params, end = block(c)
  return trunk, params + bn(end) + fc(end, classes), c


def resnext_counts(depth, width, cardinality, d, classes):
  """Xie et al. (CIFAR): stem conv3x3 64 + BN; stages of n = (depth-2)/9 blocks conv1x1(D)-BN-
  grouped conv3x3(D, C groups)-BN-conv1x1(out)-BN with D = C*d*2^(s-1), out = 64*width*2^(s-1),
  a conv1x1 + BN projection where the shape changes; fc on the last stage."""
  n = (depth - 2) // 9

  def stage(c_in, s):
    inner, out = cardinality * d * 2 ** (s - 1), 64 * width * 2 ** (s - 1)
    total = 0
    for i in range(n):
      c = c_in if i == 0 else out
      total += (conv(c, inner, 1) + bn(inner) + conv(inner, inner, 3, cardinality) + bn(inner)
                + conv(inner, out, 1) + bn(out))
      total += conv(c, out, 1) + bn(out) if c != out or (i == 0 and s > 1) else 0
    return total, out

  trunk = conv(3, 64, 3) + bn(64)
  params1, c1 = stage(64, 1)
  params2, c2 = stage(c1, 2)
  params3, c3 = stage(c2, 3)
  return trunk + params1 + params2, params3 + fc(c3, classes), c2


# (kind, depth, options, classes, published count of the baseline where the literature gives
# one, counts by the definition above)
PUBLISHED = [
    ("wrn", 28, dict(width=10), 10, 36_479_194, wrn_counts(28, 10, 10)),     # WRN-28-10, 36.5M
    ("wrn", 16, dict(width=4), 100, 2_772_020, wrn_counts(16, 4, 100)),      # WRN-16-4, 2.7M
    ("vgg", 16, dict(), 10, 14_728_266, vgg16_counts(64, 10)),               # VGG-16-BN, 14.7M
    ("densenet", 100, dict(growth_rate=12), 10, 769_162,
     densenet_counts(100, 12, True, 10)),                                     # BC-100-12, 0.8M
    ("densenet", 190, dict(growth_rate=40), 10, 25_624_430,
     densenet_counts(190, 40, True, 10)),                                     # BC-190-40, 25.6M
    ("densenet", 40, dict(growth_rate=12, bottleneck=False), 10, 1_019_722,
     densenet_counts(40, 12, False, 10)),                                     # DenseNet-40-12, 1.0M
    ("resnext", 29, dict(cardinality=8, group_width=64), 10, 34_426_698,
     resnext_counts(29, 4, 8, 64, 10)),                                       # 8x64d, 34.4M
]


def _counts(spec):
  params = spec.abstract_variables()["params"]
  return {part: models.count_params(tree) for part, tree in params.items()}


@pytest.mark.parametrize("kind,depth,options,classes,published,derived", PUBLISHED,
                         ids=[f"{p[0]}-{p[1]}" for p in PUBLISHED])
def test_baseline_counts_are_the_published_ones(kind, depth, options, classes, published,
                                                derived):
  trunk, branch, _ = derived
  got = _counts(S(kind, depth, classes, **options))
  assert got == {"trunk": trunk, "branch": branch}
  assert trunk + branch == published


# ONE with B branches: trunk + B x (branch + gate column), a gate column being the Dense
# weights F and bias of one branch plus its BatchNorm scale and bias: F + 3.
TINY = {"wrn": (10, dict(width=2)), "vgg": (11, dict(width=4)),
        "densenet": (10, dict(growth_rate=4)), "resnext": (11, dict(width=1, cardinality=2,
                                                                     group_width=2)),
        "imagenet_resnet": (10, dict())}   # ResNet-10 (tests/architectures/test_imagenet_resnet.py: 18-50)
ONE_CASES = [("wrn", 28, dict(width=10), wrn_counts(28, 10, 100)),
             ("vgg", 16, dict(), vgg16_counts(64, 100)),
             ("densenet", 40, dict(growth_rate=12, bottleneck=False),
              densenet_counts(40, 12, False, 100)),
             ("resnext", 29, dict(cardinality=8, group_width=64), resnext_counts(29, 4, 8, 64, 100))]


@pytest.mark.parametrize("kind,depth,options,derived", ONE_CASES, ids=[c[0] for c in ONE_CASES])
def test_one_counts_follow_from_the_baseline(kind, depth, options, derived):
  trunk, branch, features = derived
  for b in (1, 3, 5):
    spec = S(f"one_{kind}", depth, 100, b, **options)
    assert spec.num_params() == trunk + b * (branch + features + 3)
    assert _counts(spec)["gate"] == b * (features + 3)


# ----------------------------------------------------------------------------- forward


IMAGES = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))


def random_variables(spec, seed=0):
  """Variables of `spec` drawn with numpy from its abstract shapes (no init to compile):
  kernels N(0, 1/fan_in), BatchNorm near identity, zero gate offsets."""
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = path[-1].key
    if name == "kernel":
      fan_in = int(np.prod(s.shape[-4:-1])) if len(s.shape) >= 4 else s.shape[-2]
      return rng.normal(0, fan_in ** -0.5, s.shape).astype(np.float32)
    if name in ("scale", "var"):
      return rng.uniform(0.8, 1.2, s.shape).astype(np.float32)
    if name == "log_weight":
      return np.zeros(s.shape, np.float32)
    return rng.normal(0, 0.1, s.shape).astype(np.float32)  # biases, BatchNorm means

  return jax.tree_util.tree_map_with_path(draw, spec.abstract_variables())


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request):
  """(spec, variables, output) of a tiny 3-branch ONE model of each family."""
  depth, options = TINY[request.param]
  spec = S(f"one_{request.param}", depth, 5, 3, **options)
  variables = random_variables(spec)
  return spec, variables, spec.build().apply(variables, IMAGES)


def test_forward_shapes_and_gated_ensemble(tiny):
  spec, variables, out = tiny
  chex.assert_shape(out.branch_logits, (3, 2, 5))
  chex.assert_shape(out.gate, (2, 3))
  chex.assert_trees_all_close(out.gate.sum(axis=1), jnp.ones(2), atol=1e-6)
  manual = sum(out.gate[:, b, None] * out.branch_logits[b] for b in range(3))
  chex.assert_trees_all_close(out.ensemble_logits, manual, atol=1e-4)
  # The loop and vmap implementations are one model.
  vmapped = spec.build(branch_impl="vmap").apply(variables, IMAGES)
  chex.assert_trees_all_close(vmapped.branch_logits, out.branch_logits, atol=1e-4, rtol=1e-4)


def surgery_variables(state):
  return {k: v for k, v in state.items() if k in ("params", "batch_stats", "gate_offset")}


def test_surgery_on_every_family(tiny):
  """expand (copy) keeps the ensemble; extract, merge and transplant equal the sources'
  branches."""
  spec, variables, out = tiny
  state = dict(variables, step=np.int32(0))
  info = spec.to_dict()

  grown, grown_info = surgery.expand(state, info, 5, mode="copy", sources=[0, 1])
  grown_out = S.from_dict(grown_info).build().apply(surgery_variables(grown), IMAGES)
  chex.assert_trees_all_close(grown_out.ensemble_logits, out.ensemble_logits, atol=1e-4)

  single, single_info = surgery.extract(state, info, branch=2)
  assert not S.from_dict(single_info).branched
  logits = S.from_dict(single_info).build().apply(surgery_variables(single), IMAGES)
  chex.assert_trees_all_close(logits, out.branch_logits[2], atol=1e-5)

  merged, merged_info = surgery.merge([dict(single, step=np.int32(0)), state],
                                      [single_info, info])
  got = S.from_dict(merged_info).build().apply(surgery_variables(merged), IMAGES)
  chex.assert_trees_all_close(got.branch_logits, jnp.concatenate(
      [out.branch_logits[2:3], out.branch_logits]), atol=1e-5)

  swapped, swapped_info = surgery.transplant(state, info, state, info, branch=1, slot=0)
  got = S.from_dict(swapped_info).build().apply(surgery_variables(swapped), IMAGES)
  chex.assert_trees_all_close(got.branch_logits[0], out.branch_logits[1], atol=1e-5)


def test_mixing_architectures_is_refused():
  wrn = S("one_wrn", 10, 5, 2, width=1)
  wider = S("one_wrn", 10, 5, 2, width=2)
  resnet = S("one_resnet", 8, 5, 2)
  for other, needle in ((resnet, "needs models of one architecture"),
                        (wider, "has width 2 but")):
    states = [dict(random_variables(s), step=0) for s in (wrn, other)]
    with pytest.raises(surgery.SurgeryError) as e:
      surgery.merge(states, [wrn.to_dict(), other.to_dict()])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_options_round_trip_through_meta_and_config(tiny):
  spec = tiny[0]
  info = spec.to_dict()
  assert all(info[name] == getattr(spec, name) for name in spec.options())
  assert S.from_dict(info) == spec
  with pytest.raises(ValueError, match="growth_rate=12 is not an option of one_wrn"):
    S("one_wrn", 10, 5, 2, growth_rate=12)
  # From a config: 0 leaves an option to the family; a family refuses another's option.
  config = ml_collections.ConfigDict(dict(model="one_wrn", width=0, growth_rate=0))
  model_spec.check_architecture("one_wrn", 10, config)
  config.growth_rate = 12
  with pytest.raises(ValueError, match="growth_rate=12 is not an option of model='one_wrn'"):
    model_spec.check_architecture("one_wrn", 10, config)


def test_conversion_is_for_the_cifar_resnet_only(tiny):
  spec = tiny[0]
  with pytest.raises(torch_common.ConversionError, match="conversion covers the reference's CIFAR "
                     "ResNet"):
    reference.name_table(spec)


# ----------------------------------------------------------------------------- smoke runs

SMOKE_ROWS = ["wrn16_4_cifar10", "vgg16_cifar10", "densenet40_12_cifar10",
              "resnext29_8x64d_cifar10"]


@pytest.fixture(scope="module", params=SMOKE_ROWS)
def smoke_run(request, tmp_path_factory, tiny_config):
  """A configs/paper.py row's smoke form trained for one epoch of one step, then resumed for a
  second epoch (what `python -m one_jax.main` runs)."""
  root = tmp_path_factory.mktemp(request.param)
  config = tiny_config(f"paper:{request.param}", num_epochs=1, steps_per_epoch=1,
                       milestones=(1,), synthetic_test_size=100)
  train.run(config, str(root / "run"))
  config.num_epochs = 2
  metrics = train.run(config, str(root / "run"))
  return config, root, metrics


def test_smoke_train_resume_expand_extract_vote(smoke_run):
  """The commands' paths on every family; the numbers of surgery are checked exactly, per
  family, by test_surgery_on_every_family."""
  config, root, metrics = smoke_run
  run = str(root / "run")
  assert checkpoints.restore_raw(run)[1]["epoch"] == 2  # resumed: the second epoch ran
  assert np.isfinite(metrics["test/top1/ensemble"])
  spec, variables = checkpoints.load(run)
  assert spec == model_spec.ModelSpec.from_config(config)
  # `surgery inspect` and the benchmark count the same parameters.
  total = surgery.describe_checkpoint(run).split("total")[1].split()[0]
  assert int(total.replace(",", "")) == spec.num_params()

  student = surgery.run_extract(run, 1, str(root / "student"))
  student_spec, student_vars = checkpoints.load(student)
  assert student_spec == spec.with_branches(None)
  chex.assert_trees_all_equal(student_vars["params"]["branch"], jax.tree.map(
      lambda x: x[1], variables["params"]["branches"]))

  grown = surgery.run_expand(run, str(root / "grown"), 5, mode="copy")
  grown_model, grown_vars = checkpoints.load_model(grown)
  images = np.asarray(jax.random.normal(jax.random.key(2), (2, 32, 32, 3)))
  out = grown_model.apply(grown_vars, images)
  # Voting over every subset of the 5 branches: all five under the gate are the ensemble.
  batch = {"image": images, "label": np.array([0, 1], np.int32)}
  rows = voting.vote_accuracies(grown_model, grown_vars, [batch])
  assert len(rows) == 2 ** 5 - 1 and all(r["examples"] == 2 for r in rows)
  everything = next(r for r in rows if r["size"] == 5)
  predicted = np.argmax(np.asarray(out.ensemble_logits), axis=-1) == batch["label"]
  assert everything["gate"] == pytest.approx(predicted.mean())


@pytest.mark.parametrize("variant,params,baseline_params", [
    ("resnet110_cifar10", 4_294_263, 1_704_154),        # the ONE code's: 18 bottlenecks a stage
    ("resnet110_peers_cifar10", 2_893_047, 1_147_738),  # OKDDip's, PCL's: 12 a stage
])
def test_paper_rows_of_the_two_resnet_110s(variant, params, baseline_params):
  """Each configs/paper.py ResNet-110 row builds its paper's network, and so does its baseline
  (--config.model=cifar_resnet); the peers' row has the peers' recipe."""
  config = paper.get_config(variant)
  spec = model_spec.ModelSpec.from_config(config)
  assert (spec.depth, spec.num_params()) == (110, params)
  config.model = "cifar_resnet"
  assert model_spec.ModelSpec.from_config(config).num_params() == baseline_params
  assert (config.weight_decay, config.nesterov) == (
      (5e-4, True) if "peers" in variant else (1e-4, False))
