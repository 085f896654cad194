"""host_memory: freed blocks stay mapped, so reuse does not page-fault; only on the CPU."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A worker thread allocates, frees and re-allocates `size` bytes in two blocks, as XLA:CPU's
# threads do with each step's buffers, and counts the minor page faults of the second round.
_PROBE = textwrap.dedent("""
    import resource, sys, threading
    from one_jax.cpu import host_memory
    applied = host_memory.reuse_freed_memory() if sys.argv[1] == "reuse" else False
    import numpy as np
    half = int(sys.argv[2]) // 2
    def round_trip():
      a = np.ones(half, np.uint8); b = np.ones(half, np.uint8); del a, b
    faults = []
    def worker():
      round_trip()
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      round_trip()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    t = threading.Thread(target=worker); t.start(); t.join()
    print(applied, faults[0])
""")


def _probe(mode, size):
  out = subprocess.run([sys.executable, "-c", _PROBE, mode, str(size)], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout.split()
  return out[0] == "True", int(out[1])


def test_freed_memory_is_reused_without_page_faults():
  applied, faults = _probe("reuse", 40_000_000)
  assert applied                       # glibc (Linux): the setting took
  assert faults < 100, faults          # 40 MB re-touched: ~10k pages if they had been unmapped


def test_freed_memory_beyond_2_gib_is_kept_too():
  """A DenseNet step at batch 128 frees ~8 GB at once: a finite trim threshold (it was 2 GiB)
  gave it back to the kernel every step, and the step spent most of its time faulting it in."""
  applied, faults = _probe("reuse", 2_600_000_000)
  assert applied
  assert faults < 100, faults          # 2.6 GB re-touched: ~635k pages if they had been trimmed


def test_the_entry_points_flag_turns_it_off():
  script = ("from absl import flags; from one_jax import bench; "
            "from one_jax.cpu import host_memory; cli = bench.define_flags(); "
            "flags.FLAGS(['x', '--noreuse_host_memory']); "
            "print(host_memory.apply_for_cpu(cli.reuse_host_memory.value))")
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout
  assert out.strip() == "False"


def test_it_applies_only_where_jax_computes_on_the_cpu(monkeypatch):
  from one_jax.cpu import host_memory  # pylint: disable=g-import-not-at-top
  assert host_memory.computes_on_cpu({"JAX_PLATFORMS": "cpu"})
  assert not host_memory.computes_on_cpu({"JAX_PLATFORMS": "cuda,cpu"})
  assert not host_memory.computes_on_cpu({"JAX_PLATFORMS": "tpu"})
  monkeypatch.setattr(host_memory, "_accelerator_plugins_installed", lambda: True)
  assert not host_memory.computes_on_cpu({})        # a GPU plugin: JAX will prefer it
  assert host_memory.computes_on_cpu({"JAX_PLATFORMS": "cpu"})
  monkeypatch.setattr(host_memory, "_accelerator_plugins_installed", lambda: False)
  assert host_memory.computes_on_cpu({})
  monkeypatch.setattr(host_memory, "reuse_freed_memory", lambda: True)   # not this process
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  assert not host_memory.apply_for_cpu(True)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_memory.apply_for_cpu(True) and not host_memory.apply_for_cpu(False)
