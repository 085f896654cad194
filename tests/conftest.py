"""Shared test set-up: several fake CPU devices, and the repo root importable (configs/)."""
import os
import sys

# Must happen before JAX initialises its backends (chex.set_n_cpu_devices does the same).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after the environment above)

# Tests compile the same tiny programs many times (resume, 1 vs 4 devices, variants):
# a persistent compilation cache shared by the test processes saves most of that time.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("ONE_JAX_TEST_CACHE", "/tmp/one_jax_test_xla_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
