"""The reference's CIFAR training loop in PyTorch, for the ONE-gain measurement.

    python benchmarks/fidelity/torch_train.py --npz=cifar10.npz --model=one --seed=0 \
        --out=result.json [--depth=20 --epochs=10 --milestones=5,7 --rampup=2.6667 ...]

As the authors' cifar_one.py / cifar_baseline.py do it, with tests/torch_reference.py's
models: DataLoader(shuffle=True, drop_last=False) over the training set (--drop_last skips the
last partial batch, as one_jax does) with RandomCrop(32, 4) + RandomHorizontalFlip + Normalize
(torchvision's semantics in torch ops), torch.optim.SGD (momentum, coupled weight decay), lr x
gamma at the start of each milestone epoch, the KL ramp-up weight of the 0-based epoch, T = 3.
At the end the test set is evaluated once in eval mode; the result (top-1 in percent of each
branch, their mean and the ensemble, or of the baseline) is written as JSON to --out. With --checkpoint the run is saved after every epoch
and a rerun continues from there, identically (weights, optimizer, RNG).
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from one_jax.data import in_memory  # noqa: E402  (the .npz reader, both layouts)
from tests import torch_reference as tr  # noqa: E402


class _Images(torch.utils.data.Dataset):
  """uint8 HWC images -> the reference's train or test transform (draws from torch's RNG)."""

  def __init__(self, source, train: bool):
    self.images, self.labels, self.train = source.images, source.labels, train

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    transform = tr.train_transform if self.train else tr.test_transform
    return transform(self.images[i]), int(self.labels[i])


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--npz", required=True, help="x_train, y_train, x_test, y_test (or packed JPEGs)")
  p.add_argument("--model", choices=("baseline", "one"), required=True)
  p.add_argument("--out", required=True, help="the result JSON to write")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--depth", type=int, default=20)
  p.add_argument("--branches", type=int, default=3)
  p.add_argument("--num_classes", type=int, default=10)
  p.add_argument("--epochs", type=int, default=10)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--test_batch", type=int, default=100)
  p.add_argument("--lr", type=float, default=0.1)
  p.add_argument("--momentum", type=float, default=0.9)
  p.add_argument("--weight_decay", type=float, default=1e-4)
  p.add_argument("--milestones", default="5,7", help="epochs (0-based) where lr *= gamma")
  p.add_argument("--gamma", type=float, default=0.1)
  p.add_argument("--rampup", type=float, default=10 * 80 / 300, help="KL ramp-up, in epochs")
  p.add_argument("--drop_last", action="store_true",
                 help="skip each epoch's last partial batch, as one_jax does (the reference "
                      "trains on it)")
  p.add_argument("--steps_per_epoch", type=int, default=-1, help="> 0: cap (smoke runs)")
  p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
  p.add_argument("--checkpoint", default="",
                 help="save the run here after every epoch and resume from it if it exists")
  p.add_argument("--memory_format", choices=("channels_last", "nchw"), default="channels_last",
                 help="model and batch layout: channels_last is PyTorch's fastest on a CPU "
                      "(~1.45x NCHW, benchmarks/NOTES.md); the math is the same")
  return p.parse_args(argv)


def _milestones(text):
  try:
    return tuple(int(m) for m in text.split(",") if m.strip())
  except ValueError:
    raise ValueError(f"--milestones={text!r} is invalid: give epochs as integers, e.g. 5,7") \
        from None


def train(args) -> dict:
  milestones = _milestones(args.milestones)
  train_source, test_source = in_memory.load_npz(args.npz, args.num_classes)
  torch.manual_seed(args.seed)
  model = (tr.ONE_ResNet(args.depth, args.num_classes, args.branches) if args.model == "one"
           else tr.ResNet(args.depth, args.num_classes))
  layout = (torch.channels_last if args.memory_format == "channels_last"
            else torch.contiguous_format)
  model = model.to(memory_format=layout)
  optimizer = tr.sgd(model, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
  loader = torch.utils.data.DataLoader(_Images(train_source, True), batch_size=args.batch,
                                       shuffle=True, drop_last=args.drop_last)
  lr, steps, first, elapsed = args.lr, 0, 0, 0.0
  if args.checkpoint and os.path.exists(args.checkpoint):
    first, lr, steps, elapsed = _resume(args.checkpoint, model, optimizer)
    print(f"resuming from {args.checkpoint} after epoch {first}", flush=True)
  start = time.time() - elapsed
  for epoch in range(first, args.epochs):
    lr = tr.adjust_learning_rate(optimizer, lr, epoch, milestones, args.gamma)
    for i, (images, labels) in enumerate(loader):
      if 0 < args.steps_per_epoch <= i:
        break
      tr.train_step_terms(model, optimizer, images.contiguous(memory_format=layout), labels,
                          epoch, args.rampup)
      steps += 1
    # One line per epoch, so a run of hours shows how far it is.
    print(f"epoch {epoch + 1}/{args.epochs}: {steps} steps, {time.time() - start:.0f} s",
          flush=True)
    if args.checkpoint:
      _save(args.checkpoint, model, optimizer, epoch + 1, lr, steps, time.time() - start)
  train_time = time.time() - start
  return {"implementation": "pytorch", "model": args.model, "seed": args.seed,
          "memory_format": args.memory_format, "drop_last": args.drop_last,
          "top1": evaluate(model, test_source, args.test_batch), "steps": steps,
          # A fingerprint of the final weights: equal runs (a resumed one and a straight one)
          # have equal sums.
          "weights_l1": float(sum(p.detach().double().abs().sum() for p in model.parameters())),
          "train_time_s": train_time}


def _save(path, model, optimizer, epochs_done, lr, steps, elapsed):
  """Everything the next epoch depends on, the global RNG included (the DataLoader's shuffle
  and the augmentation draw from it), written atomically: a stopped run loses one epoch."""
  state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
           "epochs_done": epochs_done, "lr": lr, "steps": steps, "elapsed_s": elapsed,
           "rng": torch.get_rng_state()}
  tmp = path + ".tmp"
  torch.save(state, tmp)
  os.replace(tmp, path)


def _resume(path, model, optimizer):
  """(epochs done, lr, steps, seconds) of a _save'd run, its weights and RNG restored.
  weights_only: loading never runs code from the file."""
  state = torch.load(path, weights_only=True)
  model.load_state_dict(state["model"])
  optimizer.load_state_dict(state["optimizer"])
  torch.set_rng_state(state["rng"])
  return state["epochs_done"], state["lr"], state["steps"], state["elapsed_s"]


@torch.no_grad()
def evaluate(model, source, batch: int) -> dict:
  """Top-1 (percent) of every head over the whole test set, in eval mode."""
  model.eval()
  loader = torch.utils.data.DataLoader(_Images(source, False), batch_size=batch)
  correct, count = {}, 0
  for images, labels in loader:
    if isinstance(model, tr.ONE_ResNet):
      logits, _, ensemble = model(images)
      heads = {f"branch_{b}": z for b, z in enumerate(logits)}
      heads["ensemble"] = ensemble
    else:
      heads = {"model": model(images)}
    for name, z in heads.items():
      correct[name] = correct.get(name, 0) + int((z.argmax(1) == labels).sum())
    count += len(labels)
  top1 = {name: 100.0 * c / count for name, c in correct.items()}
  branches = [v for k, v in top1.items() if k.startswith("branch_")]
  if branches:
    top1["mean_branch"] = float(np.mean(branches))
  return top1


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.threads > 0:
    torch.set_num_threads(args.threads)
  try:
    result = train(args)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
