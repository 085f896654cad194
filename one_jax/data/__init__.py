"""The data layer: `sources.get_datasets` (the front door) above the sources it picks from,
`in_memory` (CIFAR-10/100, SVHN, .npz, synthetic) and `imagenet`; `device_data` (the train set
in device memory); `common` (what they all share)."""
