"""Per-executable XLA compiler options: which CPU library runs the convolutions.

XLA:CPU hands convolutions, matrix products and reductions to the YNNPACK library by default.
For this model's shapes its own Eigen convolutions are faster (ONE-ResNet32, batch 128, one
train step on a 2-core AVX-512 CPU: 10-14% less time for 1-5 branches, and the forward
convolutions of the 16x16x32 and 8x8x64 stages 1.3-1.6x faster; benchmarks/NOTES.md,
entry 6). The choice is made per executable (jax.jit's `compiler_options`), so nothing
global changes and other backends are untouched.
"""
from typing import Any, Dict, Optional

CPU_CONV_LIBRARIES = ("auto", "eigen", "ynnpack")

_YNN_FUSION_TYPE = "xla_cpu_experimental_ynn_fusion_type"
# Reductions (BatchNorm statistics) stay with YNNPACK: measured faster than XLA's own loops.
_EIGEN_CONVOLUTIONS = {_YNN_FUSION_TYPE: "LIBRARY_FUSION_TYPE_REDUCE"}


def resolve_cpu_conv_library(name: str) -> str:
  """'auto' is 'eigen', the faster of the two on the CPUs measured."""
  if name not in CPU_CONV_LIBRARIES:
    raise ValueError(f"cpu_conv_library={name!r} is unknown: use one of "
                     f"{', '.join(CPU_CONV_LIBRARIES)}")
  return "eigen" if name == "auto" else name


def cpu_conv_library(config, platform: str) -> Optional[str]:
  """The library that runs `config`'s convolutions on `platform`; None off CPU."""
  library = resolve_cpu_conv_library(config.get("cpu_conv_library", "auto"))
  return library if platform == "cpu" else None


def compiler_options(config, platform: str) -> Dict[str, Any]:
  """The options for a step of `config` compiled for `platform` ('cpu', 'gpu', 'tpu')."""
  if cpu_conv_library(config, platform) != "eigen":
    return {}
  return dict(_EIGEN_CONVOLUTIONS)
