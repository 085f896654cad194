"""The reference PyTorch train step in the set-ups the benchmarks compare one_jax against.

One place for how PyTorch is made fast, so benchmarks/torch_vs_jax.py (CPU) and
benchmarks/gpu_bench.py (CUDA) time the same thing under the same names:

  nchw           eager float32, default (NCHW) memory format: the reference as written
  channels_last  eager float32 with the model and input in channels_last (NHWC) memory
  compile        torch.compile of the channels_last model, float32
  amp_cl         channels_last under autocast bfloat16 (accelerators' tensor cores)
  amp_compile    torch.compile of amp_cl

The model, ONE loss and SGD are tests/torch_reference.py's on a fixed batch already on the
device (PyTorch gets no input pipeline cost).
"""
import numpy as np

MODES = ("nchw", "channels_last", "compile", "amp_cl", "amp_compile")
NAMES = {"nchw": "PyTorch eager float32 NCHW",
         "channels_last": "PyTorch eager float32 channels_last",
         "compile": "PyTorch torch.compile float32 channels_last",
         "amp_cl": "PyTorch eager autocast bf16 channels_last",
         "amp_compile": "PyTorch torch.compile autocast bf16 channels_last"}


def check_modes(modes) -> list:
  """The modes, or a ValueError naming the unknown ones and the known."""
  unknown = [m for m in modes if m not in MODES]
  if unknown:
    raise ValueError(f"unknown PyTorch set-up(s) {unknown}: use {', '.join(MODES)}")
  return list(modes)


class TorchStep:
  """One set-up's train step on one fixed batch; `train_once()` returns the loss tensor."""

  def __init__(self, mode: str, *, depth: int, num_classes: int, num_branches: int,
               images_nhwc: np.ndarray, labels: np.ndarray, lr=0.1, momentum=0.9,
               weight_decay=1e-4, seed=0, device=None):
    # PyTorch is imported here, not at import: the scripts also run one_jax alone without it.
    import torch  # pylint: disable=g-import-not-at-top
    from tests import torch_reference  # pylint: disable=g-import-not-at-top  (lives with tests)
    check_modes([mode])
    self.torch, self.reference, self.mode = torch, torch_reference, mode
    self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    model = torch_reference.ONE_ResNet(depth, num_classes, num_branches).to(self.device)
    images = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
    self.images = images.to(self.device)
    self.labels = torch.from_numpy(labels.astype(np.int64)).to(self.device)
    if mode != "nchw":
      model = model.to(memory_format=torch.channels_last)
      self.images = self.images.contiguous(memory_format=torch.channels_last)
    self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                                     weight_decay=weight_decay)
    self.model = torch.compile(model) if mode.endswith("compile") else model

  def train_once(self):
    step = lambda: self.reference.train_step(self.model, self.optimizer, self.images,
                                             self.labels, epoch=1.0)
    if self.mode.startswith("amp"):
      with self.torch.autocast(device_type=self.device, dtype=self.torch.bfloat16):
        return step()
    return step()
