"""Shared test set-up: several fake CPU devices, so data-parallel code is exercised on CPU."""
import os

# Must happen before JAX initialises its backends (chex.set_n_cpu_devices does the same).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
