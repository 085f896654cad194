"""The stacked view every surgery operation works on (DESIGN.md section 6).

Branch slots. Every leaf under 'branches' has its branch slot on axis 0, every gate leaf
(dense kernel [F, B], biases, BatchNorm entries, the offset [B]) on its last axis. Here gate
leaves are moved to slot-first and a baseline's 'branch' is read as 'branches' with one slot
and no gate, so each operation is the same few lines for every kind of source: take slots
(x[b:b + 1]) and concatenate them on axis 0.

Optimizer state. opt_state is a flax state dict of an unknown optax optimizer. Its subtrees
with the dict structure of the parameters (momentum traces, gradient-ratio factors, ...) get
the edit of the parameters, leaf by leaf: under 'branches' on axis 0; a gate leaf only where it
has the parameter's shape (otherwise it has no branch axis and is kept whole); trunk leaves as
the trunk. Everything else (step counters) comes from the trunk's source. A slot with no
optimizer state of its own (fresh, or from a source saved without one) gets zeros in
parameter-shaped buffers (momentum: a branch that has not moved yet) and, in reduced leaves
(per-module statistics such as learning-rate factors, where zero would freeze the branch), the
mean of that subtree's reduced leaves. reset_optimizer=True leaves opt_state out, so training
starts its optimizer afresh (zero momentum).

"""
import collections
import dataclasses
import functools
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple, Union

from flax import traverse_util
import jax
import numpy as np

from one_jax import validate
from one_jax.architectures import model_spec, models


class SurgeryError(ValueError):
  """A surgery request that cannot be carried out; the one-line message names the fix."""


Key = Tuple[Tuple[str, ...], Tuple[str, ...]]  # (tree, path inside the tree)
PARAMS, STATS, OFFSET = ("params",), ("batch_stats",), ("gate_offset",)
MODEL_TREES = (PARAMS, STATS, OFFSET)
# PCL's temporal mean: a second params and batch_stats, edited slot for slot as the model's
# (a source without one lends its live variables: the temporal mean of a model not yet
# trained as PCL is the model itself); its update count goes with the trunk, as 'step' does.
TEMPORAL = "temporal_mean"
TM_PARAMS, TM_STATS = (TEMPORAL, "params"), (TEMPORAL, "batch_stats")
LIVE_TREE = {TM_PARAMS: PARAMS, TM_STATS: STATS}
OPT = "opt_state"
# A fresh gate column (fresh_gate='zero'): zero dense weights, BatchNorm at its initial values,
# no offset. Such a column's activation is ReLU(0) = 0 on every input and gets no gradient: next
# to trained columns it is a fixed reference, but a gate made only of them (merged baselines)
# stays uniform in training. fresh_gate='init' takes the columns of a fresh initialisation.
FRESH_GATE = {("dense", "kernel"): 0.0, ("dense", "bias"): 0.0, ("bn", "scale"): 1.0,
              ("bn", "bias"): 0.0, ("bn", "mean"): 0.0, ("bn", "var"): 1.0,
              ("log_weight",): 0.0}
FRESH_GATES = ("zero", "init")
# Parts every branch shares, edited as the trunk is (taken from the trunk's source): OKDDip's
# query and key projections ('attention'), FFL's fusion module ('fusion': its shapes follow
# the branch count; expand grows it afterwards, grow_fusion).
SHARED_PARTS = ("trunk", "attention", "fusion")
INIT_IMAGE_SHAPE = (1, 8, 8, 3)  # parameter shapes do not depend on the image size


# ---------------------------------------------------------------------------------------------
# Nested dicts <-> flat {path: leaf}: flax.traverse_util.flatten_dict / unflatten_dict.

_flatten = traverse_util.flatten_dict
_unflatten = traverse_util.unflatten_dict


def _keytree(tree):
  return {k: _keytree(v) for k, v in tree.items()} if isinstance(tree, Mapping) else None


def _params_like_paths(opt_state, params) -> List[Tuple[str, ...]]:
  """Paths of the subtrees of opt_state whose dict structure is that of params."""
  target, found = _keytree(params), []

  def walk(node, path):
    if not isinstance(node, Mapping):
      return
    if _keytree(node) == target:
      found.append(path)
      return
    for k, v in node.items():
      walk(v, path + (k,))

  walk(opt_state, ())
  return found


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _replace(tree, path, new):
  if not path:
    return new
  return {**tree, path[0]: _replace(tree[path[0]], path[1:], new)}


def _copy(tree):
  return jax.tree.map(np.array, tree)


# ---------------------------------------------------------------------------------------------
# Model descriptions (model_spec.ModelSpec; the checkpoint meta's 'model' entry is spec.to_dict()).


def check_info(info, what: str) -> model_spec.ModelSpec:
  """The ModelSpec of a model info (meta['model'], or a spec), else SurgeryError."""
  if isinstance(info, model_spec.ModelSpec):
    return info
  if not isinstance(info, Mapping) or info.get("kind") not in model_spec.ARCHITECTURES:
    kind = info.get("kind") if isinstance(info, Mapping) else info
    raise SurgeryError(f"{what} has model kind {kind!r}: surgery works on one_jax checkpoints of "
                       f"a model of kind {' or '.join(model_spec.ARCHITECTURES)}")
  try:
    return model_spec.ModelSpec.from_dict(info)
  except ValueError as e:
    text = str(e)
    if text.startswith("claims "):
      raise SurgeryError(f"{what} {text}") from None
    raise SurgeryError(f"{what} has invalid model info {dict(info)}: {text}") from None


def check_same_architecture(specs, whats, op: str) -> None:
  """Models whose branches combine: one architecture family, depth, architecture options
  (width, growth rate, ...), block type and class count."""
  first = specs[0].to_dict()
  for spec, what in zip(specs[1:], whats[1:]):
    if spec.with_branches(None).kind != specs[0].with_branches(None).kind:
      raise SurgeryError(f"{op}: {what} is a {spec.describe()} but {whats[0]} is a "
                         f"{specs[0].describe()}: {op} needs models of one architecture")
    info = spec.to_dict()
    for field in ("depth",) + model_spec.OPTIONS + ("block", "num_classes"):
      if info.get(field) != first.get(field):
        name = {"block": "block type", "num_classes": "class count"}.get(
            field, field.replace("_", " "))
        raise SurgeryError(f"{op}: {what} has {name} {info.get(field)} but {whats[0]} has "
                           f"{first.get(field)}: {op} needs models of the same depth, "
                           "architecture options, block type and class count")


def _template(spec: model_spec.ModelSpec) -> Dict[Key, jax.ShapeDtypeStruct]:
  """Flat {(tree, path): shape and dtype} of the variables of a model of this spec."""
  shapes = spec.abstract_variables(INIT_IMAGE_SHAPE[1:])
  trees = [(tree,) for tree in shapes if tree != TEMPORAL]
  trees += [tree for tree in LIVE_TREE if TEMPORAL in shapes]
  return {(tree, path): s for tree in trees for path, s in _flatten(_get(shapes, tree)).items()}


def _zeros_state(spec) -> Dict[str, Any]:
  """The variables of a model of `spec`, all zeros (a template for the output of an edit)."""
  flat = {tree + path: np.zeros(s.shape, s.dtype) for (tree, path), s in _template(spec).items()}
  return _unflatten(flat)


def _with_count(state, spec, count):
  """`state` with the temporal mean's update count, where `spec` keeps a temporal mean."""
  if spec.temporal_mean:
    state[TEMPORAL]["count"] = np.asarray(0 if count is None else count, np.int32)
  return state


# ---------------------------------------------------------------------------------------------
# A checkpoint state seen as a ONE model: flat leaves, every branch or gate slot on axis 0.


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
  spec: model_spec.ModelSpec
  leaves: Dict[Key, np.ndarray]
  slotted: FrozenSet[Key]           # leaves with a branch slot on axis 0
  opt_state: Optional[Dict[str, Any]]  # the raw state dict (for what is not params-like)
  opt_trees: Tuple[Tuple[str, ...], ...]  # trees (OPT, *path) of its params-like subtrees
  step: np.ndarray
  temporal_count: Optional[np.ndarray] = None   # PCL's temporal-mean updates (None: no mean)

  @property
  def num_branches(self) -> int:
    return self.spec.num_branches

  @property
  def has_gate(self) -> bool:
    return self.spec.has_gate

  def slot(self, key, b):
    """Branch slot b of a leaf, keeping the slot axis (a [1, ...] copy); a leaf without slots
    (a trunk that is not per branch) is one slot, whatever b."""
    if key not in self.slotted:
      return np.array(self.leaves[key])[None]
    return np.array(self.leaves[key][b:b + 1])


def _normalise(path, x, param_shape, num_branches, independent=False):
  """(path, leaf, slotted) in the slot-first layout; param_shape None for model variables;
  independent: the trunk is per branch too (DML's B networks)."""
  part = path[0]
  if part == "branch":  # a baseline's single branch is slot 0 of 'branches'
    return ("branches",) + path[1:], x[None], True
  if part == "branches" or part == "trunk" and independent:
    return path, x, x.ndim >= 1 and x.shape[0] == num_branches
  if part == "gate" and (param_shape is None or x.shape == param_shape):
    return path, np.moveaxis(x, -1, 0), True
  return path, x, False


def view(state, info, what: str) -> Model:
  """Validates a checkpoint state against its info and reads it as a Model (copies leaves)."""
  spec = check_info(info, what)
  if not isinstance(state, Mapping) or "params" not in state or "batch_stats" not in state:
    raise SurgeryError(f"{what} has no 'params' and 'batch_stats': it is not a model checkpoint")
  trees = (PARAMS, STATS) + (tuple(LIVE_TREE) if spec.temporal_mean and TEMPORAL in state
                             else ())
  variables = {tree: _flatten(_get(state, tree)) for tree in trees}
  num_branches = spec.num_branches
  if spec.has_gate:
    offset = state.get("gate_offset", {"log_weight": np.zeros([num_branches], np.float32)})
    variables[OFFSET] = _flatten(offset)
  expected = {key: tuple(s.shape) for key, s in _template(spec).items()}
  got = {(tree, path): tuple(np.shape(x)) for tree, flat in variables.items()
         for path, x in flat.items()}
  if got != expected:
    diff = sorted(set(got.items()) ^ set(expected.items()))[0]
    raise SurgeryError(f"{what}'s variables do not match its model info ({spec.describe()}): "
                       f"{'/'.join(diff[0][0] + diff[0][1])} differs; the checkpoint is corrupt "
                       "or its metadata is wrong")
  leaves, slotted = {}, set()
  for tree, flat in variables.items():
    for path, x in flat.items():
      if tree == OFFSET:
        path = ("gate",) + path
      path, x, is_slot = _normalise(path, np.array(x), None, num_branches, spec.independent)
      leaves[(tree, path)] = x
      if is_slot:
        slotted.add((tree, path))
  opt_state, opt_trees = state.get(OPT), []
  if opt_state is not None:
    if not isinstance(opt_state, Mapping):
      raise SurgeryError(f"{what}'s optimizer state is not a state dict: save it with "
                         "flax.serialization.to_state_dict")
    params = state["params"]
    for sub in _params_like_paths(opt_state, params):
      tree = (OPT,) + sub
      opt_trees.append(tree)
      for path, x in _flatten(_get(opt_state, sub)).items():
        param_shape = tuple(np.shape(_get(params, path)))
        path, x, is_slot = _normalise(path, np.array(x), param_shape, num_branches,
                                       spec.independent)
        leaves[(tree, path)] = x
        if is_slot:
          slotted.add((tree, path))
  count = np.array(state[TEMPORAL].get("count", 0)) if spec.temporal_mean else None
  return Model(spec=spec, leaves=leaves, slotted=frozenset(slotted), opt_state=opt_state,
               opt_trees=tuple(opt_trees), step=np.array(state.get("step", 0)),
               temporal_count=count)


def with_temporal_mean(model: Model) -> Model:
  """`model` with temporal-mean leaves: its own, or copies of its live variables where it has
  none (a source that was not trained as PCL)."""
  extra = {(tm, path): x for (tree, path), x in model.leaves.items() for tm, live in
           LIVE_TREE.items() if tree == live and (tm, path) not in model.leaves}
  if not extra:
    return model
  slotted = {(tm, path) for tm, live in LIVE_TREE.items() for (tree, path) in model.slotted
             if tree == live}
  return dataclasses.replace(model, leaves={**model.leaves, **extra},
                             slotted=model.slotted | frozenset(slotted))


def temporal_as_live(model: Model, what: str) -> Model:
  """The temporal-mean model of a PCL `model` as a model of its own (its variables in place of
  the live ones; no optimizer state: the temporal mean never had momentum)."""
  if model.temporal_count is None:
    raise SurgeryError(f"{what} ({model.spec.describe()}) keeps no temporal mean: take its live "
                       "weights (--weights=live), or give a PCL model")
  leaves = {(LIVE_TREE.get(tree, tree), path): x for (tree, path), x in model.leaves.items()
            if tree in LIVE_TREE or tree == OFFSET}
  slotted = {(LIVE_TREE.get(tree, tree), path) for (tree, path) in model.slotted
             if tree in LIVE_TREE or tree == OFFSET}
  return dataclasses.replace(model, leaves=leaves, slotted=frozenset(slotted), opt_state=None,
                             opt_trees=())


def fresh_model(spec: model_spec.ModelSpec, rng) -> Model:
  """A freshly initialised model of this spec (no optimizer state)."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  if isinstance(rng, (int, np.integer)):
    rng = jax.random.PRNGKey(int(rng))
  variables = spec.init(rng, INIT_IMAGE_SHAPE[1:])
  return view(jax.tree.map(np.asarray, dict(variables)), spec, "the fresh model")


# ---------------------------------------------------------------------------------------------
# The one edit behind every operation: pick a source for the trunk, for each branch slot and for
# each gate column, and concatenate.

Slot = Tuple[Optional[Model], int]  # (source model, its branch index); None: a fresh gate column


def check_index(op, name, index, size, what):
  if not validate.is_int(index) or not 0 <= index < size:
    raise SurgeryError(f"{op}: {name}={index!r} is out of range: {what} has {size} branch"
                       f"{'es' if size != 1 else ''} (0-based: 0..{size - 1})")


def _opt_layout(model: Model):
  """(what lies outside the params-like subtrees, {key: form} inside them): what must agree
  between optimizer states to be combined. A form is (slotted, shape without the slot axis)."""
  params_like = set(model.opt_trees)

  def outside(node, path=()):
    if (OPT,) + path in params_like:
      return "params-like"
    if isinstance(node, Mapping):
      return {k: outside(v, path + (k,)) for k, v in node.items()}
    return (tuple(np.shape(node)), str(np.asarray(node).dtype))

  forms = {}
  for key, x in model.leaves.items():
    if key[0][0] == OPT and key[1][0] == "trunk":   # per branch (DML) or not: one network's
      forms[key] = x.shape[1:] if key in model.slotted else x.shape
    elif key[0][0] == OPT:
      forms[key] = (True, x.shape[1:]) if key in model.slotted else (False, x.shape)
  return outside(model.opt_state), forms


def check_opt_compatible(op, sources: Sequence[Model], whats: Sequence[str]):
  """Optimizer states combine if they agree everywhere but in gate leaves only one of them has."""
  with_opt = [(m, w) for m, w in zip(sources, whats) if m.opt_state is not None]
  for (m, what) in with_opt[1:]:
    (outside, forms), (first_outside, first_forms) = _opt_layout(m), _opt_layout(with_opt[0][0])
    ungated = lambda f: {k for k in f if k[1][0] != "gate"}
    if (outside != first_outside or ungated(forms) != ungated(first_forms)
        or any(forms[k] != first_forms[k] for k in forms.keys() & first_forms.keys())):
      raise SurgeryError(f"{op}: the optimizer states of {with_opt[0][1]} and {what} differ "
                         "(trained with different optimizers?): pass --reset_optimizer to start "
                         "the optimizer afresh")


# The fusion parts (models.FUSIONS): leaves whose axis (negative: from the end) holds one block
# of channels per branch, in branch order (the concatenated feature maps of FFL's module, the
# concatenated pooled features of PCL's classifier); every other fusion leaf is shared. The
# leaf that maps the blocks to the output (FUSION_OUTPUT) gets zero blocks for new branches.
FUSION_BLOCKS = {
    "fusion": {("fusion", "dw", "kernel"): -1, ("fusion", "bn_dw", "scale"): -1,
               ("fusion", "bn_dw", "bias"): -1, ("fusion", "bn_dw", "mean"): -1,
               ("fusion", "bn_dw", "var"): -1, ("fusion", "pw", "kernel"): -2},
    "peer_fusion": {("fusion", "classifier", "kernel"): -2}}
FUSION_OUTPUT = {"fusion": ("fusion", "pw", "kernel"),
                 "peer_fusion": ("fusion", "classifier", "kernel")}


def grow_fusion(state, model: "Model", plan: Sequence[Tuple[Optional["Model"], int]]):
  """`state` (assembled with `model`'s fusion part) with the fusion part of len(plan)
  branches: slot k's channel blocks from plan[k]'s (model, branch) (a fresh model's for new
  fresh slots; momentum from that source where it has one, else zero), except the output
  leaf's blocks of new slots (k >= model's branches: FFL's 1x1 convolution's input rows, PCL's
  classifier rows), which are zero, so that the fused output is unchanged on every input. The
  temporal mean's fusion part grows alike. Returns the state."""
  m = model.num_branches
  ensemble = models.ENSEMBLES[model.spec.method]
  blocked, output = FUSION_BLOCKS[ensemble], FUSION_OUTPUT[ensemble]
  for (tree, path), old in model.leaves.items():
    if path not in blocked:
      continue
    axis = blocked[path] % old.ndim
    width = old.shape[axis] // m
    blocks = []
    for k, (source, b) in enumerate(plan):
      if path == output and k >= m or source is None or (tree, path) not in source.leaves:
        shape = list(old.shape)
        shape[axis] = width
        blocks.append(np.zeros(shape, old.dtype))
      else:
        blocks.append(np.take(source.leaves[(tree, path)],
                              np.arange(b * width, (b + 1) * width), axis=axis))
    state = _replace(state, tree + path, np.concatenate(blocks, axis=axis))
  return state


def _mean(arrays):
  return np.mean(np.stack(arrays), axis=0).astype(arrays[0].dtype)


def assemble(spec: model_spec.ModelSpec, *, trunk: Union[Model, Sequence[Model]], slots: Sequence[Slot],
              gate: Optional[Sequence[Slot]], reset_optimizer: bool,
              fresh: Optional[Model] = None):
  """The state of a model of `spec` built from sources (fresh numpy arrays throughout).

  trunk: the model whose trunk (and the other SHARED_PARTS) is kept, or a list of models whose
  trunks are averaged; a shared part the trunk's sources lack (OKDDip's projections when
  baselines merge) comes from `fresh`, a freshly initialised model of `spec`, with zero momentum.
  Where the trunk is per branch (spec.independent: DML's networks) it follows the slots, and
  `trunk` is not used; a single network taken out of such a model (an extracted student)
  takes the trunk of its slot.
  slots: the source (model, branch) of each branch slot. gate: the source of each gate column
  (a model without a gate, or None, gives a fresh column); gate=None: the output is a baseline.
  The optimizer state follows, as the module docstring says.
  """
  trunks = [trunk] if isinstance(trunk, Model) else list(trunk)
  gate = [(m if m is not None and m.has_gate else None, b) for m, b in gate or []]
  out = view(_zeros_state(spec), spec, "the output")
  if spec.temporal_mean:   # every source gives a temporal mean, its own or its live variables
    lent = {}
    lend = lambda m: m if m is None else lent.setdefault(id(m), with_temporal_mean(m))
    trunks = [lend(m) for m in trunks]
    slots = [(lend(m), b) for m, b in slots]
    fresh = lend(fresh)

  def from_trunk(key, fill=None):
    if fill is None and fresh is not None and key in fresh.leaves:
      fill = functools.partial(np.array, fresh.leaves[key])
    have = [m.leaves[key] if key in m.leaves else fill() for m in trunks]
    return np.array(have[0]) if len(have) == 1 else _mean(have)

  def from_slots(key, plan, fill_slot=None):
    """Slot after slot: x[b:b + 1] of each source, concatenated on axis 0."""
    return np.concatenate([m.slot(key, b) if m is not None and key in m.leaves else fill_slot()
                           for m, b in plan], axis=0)

  def shared(key, fill=None, fill_slot=None):
    """A leaf of the trunk or another shared part: per slot where the output's trunk is per
    branch; the slot's own where the trunk comes from per-branch trunks; else from_trunk."""
    if key[1][0] == "trunk" and spec.independent:
      return from_slots(key, slots, fill_slot)
    if key[1][0] == "trunk" and any(key in m.slotted for m in trunks):
      model, b = slots[0]
      return model.slot(key, b)[0]
    return from_trunk(key, fill)

  def first_of(key, plan, fill):
    """A leaf without a branch axis: from the first source in the plan that has it."""
    have = [m for m, _ in plan if m is not None and key in m.leaves]
    return np.array(have[0].leaves[key]) if have else fill()

  # Model variables: params, batch_stats, gate_offset.
  leaves = {}
  for key, like in out.leaves.items():
    part = key[1][0]
    if part in SHARED_PARTS:
      leaves[key] = shared(key)
    elif part == "branches":
      leaves[key] = from_slots(key, slots)
    else:
      fresh_column = functools.partial(np.full, (1,) + like.shape[1:], FRESH_GATE[key[1][1:]],
                                       like.dtype)
      leaves[key] = from_slots(key, gate, fresh_column)
  state = _denormalise(leaves, out.slotted, spec)

  # Optimizer state: the same edit on every params-like subtree, the rest from the trunk's source.
  used = trunks + [m for m, _ in slots] + [m for m, _ in gate if m is not None]
  with_opt = [m for m in used if m.opt_state is not None]
  if with_opt and not reset_optimizer:
    skeleton = next((m for m in trunks if m.opt_state is not None), with_opt[0])
    opt_state = _copy(skeleton.opt_state)
    for tree in skeleton.opt_trees:
      opt_leaves, opt_slotted = {}, set()
      reduced_fill = _reduced_mean(skeleton, tree)
      for (_, path), param in [(k, x) for k, x in out.leaves.items() if k[0] == PARAMS]:
        key = (tree, path)
        is_slot, shape, dtype = _opt_form(key, out, with_opt)
        value = 0.0 if shape == param.shape[int(is_slot):] else reduced_fill
        fill = functools.partial(np.full, shape, value, dtype)
        fill_slot = functools.partial(np.full, (1,) + shape, value, dtype)
        plan = slots if path[0] == "branches" else gate
        if path[0] in SHARED_PARTS:
          opt_leaves[key] = shared(key, fill, fill_slot)
        elif is_slot:
          opt_leaves[key] = from_slots(key, plan, fill_slot)
          opt_slotted.add(key)
        else:  # no branch axis (e.g. one factor for the whole gate): kept whole
          opt_leaves[key] = first_of(key, plan, fill)
      subtree = _denormalise(opt_leaves, opt_slotted, spec)[tree]
      opt_state = _replace(opt_state, tree[1:], subtree)
    state[OPT] = opt_state
  state["step"] = np.array(trunks[0].step)
  return _with_count(state, spec, trunks[0].temporal_count)


def _opt_form(key, out: Model, with_opt: Sequence[Model]):
  """(slotted, shape without the slot axis, dtype) of an output optimizer leaf.

  From the first source that has the leaf; a gate leaf that no source has (the sources with
  optimizer state are baselines) takes the form of the subtree's trunk leaves: parameter-shaped
  (momentum), or a reduced scalar (a per-module factor).
  """
  for m in with_opt:
    if key in m.leaves:
      x = m.leaves[key]
      if key[1][0] == "trunk":   # per branch in the output or not, whatever the source's trunk
        return (key in out.slotted, x.shape[1:] if key in m.slotted else x.shape, x.dtype)
      return (True, x.shape[1:], x.dtype) if key in m.slotted else (False, x.shape, x.dtype)
  trunk = [(path, x) for (tree, path), x in with_opt[0].leaves.items()
           if tree == key[0] and path[0] == "trunk"]
  dtype = trunk[0][1].dtype if trunk else np.float32
  if all(x.shape == out.leaves[(PARAMS, path)].shape for path, x in trunk):
    return True, out.leaves[(PARAMS, key[1])].shape[1:], dtype
  return False, (), dtype


def _reduced_mean(model: Model, tree) -> float:
  """Mean of the leaves of a params-like subtree that are not parameter-shaped (0 if none)."""
  values = []
  for (t, path), x in model.leaves.items():
    if t != tree:
      continue
    param = model.leaves[(PARAMS, path)]
    if x.shape != param.shape:
      values.append(np.ravel(x))
  return float(np.mean(np.concatenate(values))) if values else 0.0


def _denormalise(leaves: Mapping[Key, np.ndarray], slotted, spec) -> Dict[Any, Any]:
  """Flat slot-first leaves -> nested trees in the checkpoint layout of `spec`."""
  trees: Dict[Tuple[str, ...], Dict[Tuple[str, ...], np.ndarray]] = collections.defaultdict(dict)
  baseline = not spec.branched
  for (tree, path), x in leaves.items():
    is_slot = (tree, path) in slotted
    if path[0] == "gate" and is_slot:
      x = np.moveaxis(x, 0, -1)
    if path[0] == "branches" and baseline:  # slot 0 is the baseline's 'branch'
      path, x = ("branch",) + path[1:], x[0] if is_slot else x
    if tree == OFFSET:
      path = path[1:]
    trees[tree][path] = x
  state: Dict[Any, Any] = {}
  for tree, flat in trees.items():
    if tree in LIVE_TREE:   # ('temporal_mean', 'params') -> state['temporal_mean']['params']
      state.setdefault(TEMPORAL, {})[tree[1]] = _unflatten(flat)
    else:
      state[tree[0] if tree in MODEL_TREES else tree] = _unflatten(flat)
  return state
