"""one_jax's CPU backend: what makes XLA:CPU train these models fast.

kernels (and csrc/): compiled convolution kernels called through XLA's FFI; convolution: the
custom-VJP convolution every model uses, which calls them on the CPU; xla_options: per-executable
XLA:CPU compiler options; host_memory: glibc settings that keep freed host memory mapped.
Other platforms use XLA's own convolutions; nothing here changes them.
"""
