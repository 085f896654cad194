"""The models: `layers` (PyTorch's initialisation and BatchNorm semantics), `models` (the CIFAR
ResNet, and the ONE wrapper of any family: OneModel, Baseline, stacked branches, the gate),
one module per further family (wrn, vgg, densenet, resnext, imagenet_resnet: trunk and branch
modules, options, checks) and `model_spec` (ModelSpec and the registry, above the families)."""
