"""Architecture families beyond the CIFAR ResNet (models.py): each module gives a family's
trunk and branch modules, its options, checks and module arguments (model_spec.family)."""
