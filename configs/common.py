"""Fields shared by every experiment config, with the reference hyper-parameters.

Configs are code: `get_config(arg)` in step1.py / step2.py starts from `base_config()` and
sets what its variant changes. Any field can be overridden on the command line with
`--config.FIELD=VALUE`.
"""
import ml_collections

DATASET_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10, "synthetic": 10}


def base_config() -> ml_collections.ConfigDict:
  """The reference ONE set-up: ResNet-32, 300 epochs, batch 128, SGD lr 0.1, wd 1e-4."""
  c = ml_collections.ConfigDict()
  # Model.
  c.model = "one_resnet"          # 'one_resnet' (ONE) or 'cifar_resnet' (its baseline); also
                                  # one_wrn/wrn, one_vgg/vgg, one_densenet/densenet, ...
  c.depth = 32                    # the family's: 6n+2 (ResNet), 6n+4 (WRN), 16 (VGG-16), ...
  # Architecture options (0 = the family's default; model_spec.OPTIONS).
  c.width = 0                     # wrn: widening factor k (WRN-28-10: 10); vgg: channels of
                                  # block 1 (64); resnext: stage-1 outputs / 64 (4)
  c.cardinality = 0               # resnext: groups of the 3x3 convolutions (8x64d: 8)
  c.group_width = 0               # resnext: channels per group in stage 1 (8x64d: 64)
  c.growth_rate = 0               # densenet: k, channels each layer adds (BC-100-12: 12)
  c.bottleneck = True             # densenet: DenseNet-BC (False: the original, DenseNet-40-12)
  c.depth_rule = ""               # cifar resnet: 'one' (6n+2; '' = it) | 'peers' (9n+2
                                  # bottleneck depths: OKDDip/PCL's ResNet-110)
  c.num_branches = 3
  c.branch_impl = "auto"          # 'auto' | 'loop' | 'vmap': same parameters, same numbers
  c.cpu_conv_library = "auto"     # 'auto' (= 'eigen') | 'eigen' | 'ynnpack': XLA:CPU kernels
  c.conv_impl = "auto"            # 'auto' | 'kernel' | 'xla': one_jax's compiled CPU convolutions
  c.compute_dtype = "float32"     # 'float32' | 'bfloat16': mixed precision (parameters stay float32)
  c.active_branches = ""          # e.g. '0,2': other branches get gate 0 and no update
  # Data.
  c.dataset = "cifar10"           # cifar10 | cifar100 | svhn | synthetic
  c.num_classes = 10
  c.npz_path = ""                 # a local .npz (x_train, y_train, x_test, y_test) instead
  c.data_dir = ""                 # TFDS data_dir ('' = TFDS default)
  c.download = True               # prepare a missing TFDS dataset (downloads it) on first use
  c.synthetic_train_size = 2048
  c.synthetic_test_size = 512
  c.data_on_device = "auto"       # 'auto' | 'true' | 'false': uint8 train set in device memory,
                                  # augmented in the step ('auto': in-memory sets up to 2 GB)
  # Optimisation (DESIGN.md section 4).
  c.batch_size = 128              # global batch, over all devices and processes
  c.eval_batch_size = 500
  c.num_epochs = 300
  c.lr = 0.1
  c.momentum = 0.9
  c.weight_decay = 1e-4
  c.nesterov = False
  c.schedule = "multistep"        # 'multistep' (reference) | 'cosine'
  c.milestones = (150, 225)
  c.gamma = 0.1
  c.warmup_epochs = 0
  c.geo_lr = 0                    # gradient-ratio learning rates every k steps (0 = off)
  c.geo_lr_min = 0.1
  c.geo_lr_max = 20.0
  c.geo_lr_ema = 0.9
  c.steps_per_epoch = -1          # > 0 caps the steps of an epoch (smoke runs)
  # The method (DESIGN.md section 3): 'one' | 'cl_ilr' | 'okddip' | 'dml' | 'kdcl' | 'ffl' | 'pcl'
  # (branched models; a baseline: 'one').
  c.method = "one"
  # ONE's loss.
  c.temperature = 3.0
  c.rampup_epochs = 80.0          # epochs, a float as the reference's --consistency_rampup
                                  # (every method's KL ramp-up w(e))
  c.kl_scale = 1.0
  c.ensemble_ce = True
  c.stop_gradient = True          # ONE's teacher is a constant in its KL terms
  # CL-ILR's loss (defaults: the OKDDip code's CL; MCL-OKD's: T 2, 0.5 / 0.5, detached).
  c.cl_ilr_temperature = 3.0
  c.cl_ilr_kl_scale = 1.0         # alpha, times w(e)
  c.cl_ilr_ce_weight = 1.0
  c.cl_ilr_detach = False         # True: each target (the others' mean) is a constant
  c.cl_ilr_backprop_scale = True  # ILR: the gradient from the branches into the trunk / B
  # OKDDip's loss (defaults: the OKDDip code's train_GL.py); its last branch is the leader.
  c.okddip_temperature = 3.0
  c.okddip_kl_scale = 1.0         # alpha, times w(e)
  c.okddip_detach = False         # True: the attention targets and the peers' mean are constants
  # DML's loss (defaults: the paper's; the OKDDip code's: others_mean, T 3, not detached).
  c.dml_temperature = 1.0
  c.dml_kl_scale = 1.0
  c.dml_rampup_epochs = 0.0       # DML has no ramp-up: the full KL weight from the first step
  c.dml_target = "pairwise"       # or 'others_mean': KL to the mean of the other peers' logits
  c.dml_detach = True             # each peer's targets (the others' logits) are constants
  # KDCL's loss (defaults: the KDCL reproduction's naive ensemble; no ramp-up).
  c.kdcl_temperature = 4.0
  c.kdcl_alpha = 0.5              # (1 - alpha) CE + alpha KL to the peers' detached mean
  # FFL's loss (defaults: FFL-pytorch's train_FFL.py, with the shared ramp-up).
  c.ffl_temperature = 3.0
  c.ffl_kl_scale = 1.0
  # PCL's loss and temporal mean (defaults: the PCL reproduction's, with the shared ramp-up).
  c.pcl_temperature = 3.0
  c.pcl_kl_scale = 1.0            # times w(e), on both KL terms
  c.pcl_ema_decay = 0.999         # the temporal mean's decay: min(1 - 1 / (step + 1), this)
  # Run.
  c.seed = 0
  c.deterministic = False         # deterministic XLA kernels (GPU): one seed, one result
  c.keep_checkpoints = 3          # the last few are kept, plus the best
  c.init_from = ""                # start from this checkpoint's variables (surgery, convert)
  c.init_optimizer_state = True   # ... and its optimizer state when it fits
  c.eval_only = False             # evaluate init_from (or the workdir's latest) and stop
  c.vote = False                  # also evaluate every subset of branches (voting table)
  c.progress_bar = True
  c.steps_per_dispatch = 1        # k train steps per jitted call (lax.scan); stops land between
  c.log_every_steps = 0           # > 0: loss terms and lr every this many steps (steps.jsonl)
  c.profile_steps = ""            # 'START,END': jax.profiler trace of those steps (WORKDIR/profile)
  c.resume_fallback = False       # resume from the checkpoint before an unreadable latest one
  c.new_run = False               # WORKDIR holds a run: start a fresh one in WORKDIR-2, -3, ...
  c.adopt_checkpoints = False     # resume checkpoints of a workdir without any stored config
  # Compiled programs kept on disk and reused by later runs, resumes and benchmarks: 'auto'
  # ($JAX_COMPILATION_CACHE_DIR, else ~/.cache/one_jax/xla), a directory, or '' (off).
  c.compilation_cache_dir = "auto"
  return c


def apply_smoke(c: ml_collections.ConfigDict) -> None:
  """A tiny synthetic run of the same code path: well under 2 minutes on 2 CPU cores."""
  c.dataset = "synthetic"
  c.num_classes = DATASET_CLASSES["synthetic"]
  c.npz_path = ""
  c.depth = 8
  c.batch_size = 64
  c.eval_batch_size = 100
  c.synthetic_train_size = 512
  c.synthetic_test_size = 250
  c.num_epochs = 2
  c.milestones = (1,)
  c.rampup_epochs = 1.0
  c.warmup_epochs = 0
  c.steps_per_epoch = 4
  c.lr = 0.05


def parse_arg(arg, variants) -> tuple:
  """'five_branch,smoke' -> ('five_branch', {'smoke'}); unknown parts name the choices."""
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  if not parts or parts[0] not in variants:
    raise ValueError(f"unknown config variant {parts[0] if parts else ''!r}: use one of "
                     f"{', '.join(variants)} (optionally followed by ',smoke' or ',deterministic')")
  flags = set(parts[1:])
  unknown = flags - {"smoke", "deterministic"}
  if unknown:
    raise ValueError(f"unknown config option(s) {', '.join(sorted(unknown))}: use 'smoke' or "
                     "'deterministic'")
  return parts[0], flags
