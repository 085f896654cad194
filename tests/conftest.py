"""Shared test set-up: several fake CPU devices, the repo root importable (configs/), and the
fixtures most tests use: the repo root and tiny (smoke) experiment configs."""
import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Must happen before JAX initialises its backends (chex.set_n_cpu_devices does the same).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402  (after the environment above)

from configs import paper, step1, step2  # noqa: E402

# Tests compile the same tiny programs many times (resume, 1 vs 4 devices, variants):
# a persistent compilation cache shared by the test processes saves most of that time.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("ONE_JAX_TEST_CACHE", "/tmp/one_jax_test_xla_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _smoke_config(variant: str = "three_branch", **overrides):
  """The ',smoke' config of a variant ('three_branch' is configs/step1.py's,
  'step2:three_into_five' configs/step2.py's, 'paper:vgg16_cifar10' configs/paper.py's), without
  a progress bar, with overrides."""
  module, _, name = variant.rpartition(":")
  config = {"": step1, "step1": step1, "step2": step2, "paper": paper}[module].get_config(
      f"{name},smoke")
  config.progress_bar = False
  config.update(overrides)
  return config


@pytest.fixture(scope="session")
def repo_root() -> str:
  """The repository's root directory (commands run there; configs/ lives there)."""
  return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_config():
  """A factory of tiny synthetic configs: tiny_config('baseline', num_epochs=1)."""
  return _smoke_config
