"""Interoperation with PyTorch: `torch_common`, what both converters (one_jax.convert for the
reference's CIFAR ResNets, one_jax.interop.convert_torchvision for torchvision's ResNets) share."""
