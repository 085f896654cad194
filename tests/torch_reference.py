"""The PyTorch reference: models, loss, training loop and data transforms, written
independently of one_jax.

Used as ground truth by the parity tests, as the eager PyTorch side of the speed benchmark and
by the PyTorch trainer of benchmarks/fidelity; it lives with the tests because it imports
torch, which one_jax itself never needs. Module and parameter names follow the reference code
(Lan1991Xu/ONE_NeurIPS2018, with bearpaw's pytorch-classification CIFAR ResNet), so
`state_dict()` keys are those of the reference checkpoints: 'layer3_1.0.conv1.weight',
'classfier3_1.weight' (sic), 'control_v1.*', 'bn_v1.*'. Branches are numbered from 1 here, as
in the reference; the branch count is free (the reference hardcodes 3). Tensors are NCHW.
"""
import math
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

TEMPERATURE = 3.0
TEACHER_EPS = 1e-7


def conv3x3(in_planes, out_planes, stride=1):
  return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = conv3x3(inplanes, planes, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = conv3x3(planes, planes)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    residual = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    out += residual
    return self.relu(out)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    residual = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    out += residual
    return self.relu(out)


def _block_and_n(depth):
  assert (depth - 2) % 6 == 0 and depth >= 8, "depth should be 6n+2"
  return (Bottleneck if depth >= 44 else BasicBlock), (depth - 2) // 6


def _make_layer(block, inplanes, planes, blocks, stride=1):
  """nn.Sequential of `blocks` blocks; returns (layer, output channels)."""
  downsample = None
  if stride != 1 or inplanes != planes * block.expansion:
    downsample = nn.Sequential(
        nn.Conv2d(inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(planes * block.expansion))
  layers = [block(inplanes, planes, stride, downsample)]
  inplanes = planes * block.expansion
  layers += [block(inplanes, planes) for _ in range(1, blocks)]
  return nn.Sequential(*layers), inplanes


def _reference_init(module):
  """Conv: normal(0, sqrt(2 / (k * k * out))); BatchNorm2d: weight 1, bias 0; Linear: default."""
  for m in module.modules():
    if isinstance(m, nn.Conv2d):
      n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
      m.weight.data.normal_(0, math.sqrt(2.0 / n))
    elif isinstance(m, nn.BatchNorm2d):
      m.weight.data.fill_(1)
      m.bias.data.zero_()


class _Trunk(nn.Module):
  """Stem + layer1 + layer2, shared by ResNet, ONE_ResNet and CL_ResNet (names as in the
  reference), and the branches of the two branched ones."""

  def _build_trunk(self, depth):
    block, n = _block_and_n(depth)
    self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(16)
    self.relu = nn.ReLU(inplace=True)
    self.layer1, inplanes = _make_layer(block, 16, 16, n)
    self.layer2, inplanes = _make_layer(block, inplanes, 32, n, stride=2)
    return block, n, inplanes

  def trunk(self, x):
    x = self.relu(self.bn1(self.conv1(x)))
    return self.layer2(self.layer1(x))  # 16x16

  def _build_branches(self, depth, num_classes, num_branches, between=None):
    """Trunk, then 'layer3_b' (b = 1..B), what `between(inplanes)` registers (ONE's gate), the
    'avgpool' and 'classfier3_b': the reference's registration order, so its key order."""
    block, n, inplanes = self._build_trunk(depth)
    self.num_branches = num_branches
    for b in range(1, num_branches + 1):
      setattr(self, f"layer3_{b}", _make_layer(block, inplanes, 64, n, stride=2)[0])
    if between is not None:
      between(inplanes)
    self.avgpool = nn.AvgPool2d(8)
    for b in range(1, num_branches + 1):
      setattr(self, f"classfier3_{b}", nn.Linear(64 * block.expansion, num_classes))
    _reference_init(self)
    # Plain lists (not registered again) so forward has no getattr-by-name per call.
    self._layer3 = [getattr(self, f"layer3_{b}") for b in range(1, num_branches + 1)]
    self._classifiers = [getattr(self, f"classfier3_{b}") for b in range(1, num_branches + 1)]

  def _branch_logits(self, x, dim=0):
    """Every branch's logits of the trunk output x, stacked on `dim`."""
    return torch.stack([fc(self.avgpool(layer(x)).flatten(1))
                        for layer, fc in zip(self._layer3, self._classifiers)], dim=dim)


class ResNet(_Trunk):
  """The reference baseline CIFAR ResNet; forward -> logits [N, C]."""

  def __init__(self, depth, num_classes=10):
    super().__init__()
    block, n, inplanes = self._build_trunk(depth)
    self.layer3, _ = _make_layer(block, inplanes, 64, n, stride=2)
    self.avgpool = nn.AvgPool2d(8)
    self.fc = nn.Linear(64 * block.expansion, num_classes)
    _reference_init(self)

  def forward(self, x):
    x = self.avgpool(self.layer3(self.trunk(x)))
    return self.fc(x.flatten(1))


class ONE_ResNet(_Trunk):  # pylint: disable=invalid-name
  """The reference ONE ResNet with `num_branches` branches.

  forward -> (branch logits [B, N, C], gate [N, B], ensemble logits [N, C]); the reference
  returns (logits_1, ..., logits_B, ensemble), i.e. tuple(branch_logits) + (ensemble,).
  """

  def __init__(self, depth, num_classes=10, num_branches=3):
    super().__init__()

    def gate(inplanes):
      self.control_v1 = nn.Linear(inplanes, num_branches)
      self.bn_v1 = nn.BatchNorm1d(num_branches)
    self._build_branches(depth, num_classes, num_branches, between=gate)
    self.avgpool_c = nn.AvgPool2d(16)

  def forward(self, x):
    x = self.trunk(x)
    gate = self.avgpool_c(x).flatten(1)
    gate = F.softmax(F.relu(self.bn_v1(self.control_v1(gate))), dim=1)
    logits = self._branch_logits(x)
    ensemble = torch.einsum("nb,bnc->nc", gate, logits)
    return logits, gate, ensemble


# torchvision.models.resnet{18,34,50,101,152}: (block, blocks per stage). Depth 10 is the
# [1, 1, 1, 1] member of the same definition.
TORCHVISION_STAGES = {10: (BasicBlock, (1, 1, 1, 1)), 18: (BasicBlock, (2, 2, 2, 2)),
                      34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3)),
                      101: (Bottleneck, (3, 4, 23, 3)), 152: (Bottleneck, (3, 8, 36, 3))}


class TorchvisionResNet(nn.Module):
  """torchvision's ImageNet ResNet (v1.5: a Bottleneck's stride on its 3x3 convolution), with
  its module names, so state_dict() has torchvision's keys ('layer4.1.downsample.0.weight',
  'fc.weight')."""

  def __init__(self, depth, num_classes=1000):
    super().__init__()
    block, counts = TORCHVISION_STAGES[depth]
    self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    inplanes = 64
    for index, (planes, blocks) in enumerate(zip((64, 128, 256, 512), counts)):
      layer, inplanes = _make_layer(block, inplanes, planes, blocks, stride=1 if not index else 2)
      setattr(self, f"layer{index + 1}", layer)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(512 * block.expansion, num_classes)
    _reference_init(self)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(self.avgpool(x).flatten(1))


def sigmoid_rampup(epoch, rampup_length):
  """The reference's consistency weight exp(-5 (1 - clip(epoch / R, 0, 1))^2)."""
  if rampup_length == 0:
    return 1.0
  phase = 1.0 - min(max(float(epoch), 0.0), rampup_length) / rampup_length
  return math.exp(-5.0 * phase * phase)


def kl_loss(pred, label, temperature=TEMPERATURE):
  """The reference KLLoss: the teacher `label` is detached and gets +1e-7 before the log."""
  predict = F.log_softmax(pred / temperature, dim=1)
  target = (F.softmax(label / temperature, dim=1) + TEACHER_EPS).detach()
  return temperature * temperature * (target * (target.log() - predict)).sum(1).sum() / pred.shape[0]


def one_loss(branch_logits, ensemble, targets, epoch, rampup=80.0) -> Tuple[torch.Tensor, Dict]:
  """The reference objective: sum_b CE(z_b) + CE(e) + w(epoch) * sum_b KLLoss(z_b, e)."""
  ce_branches = sum(F.cross_entropy(z, targets) for z in branch_logits)
  ce_ensemble = F.cross_entropy(ensemble, targets)
  kl = sum(kl_loss(z, ensemble) for z in branch_logits)
  weight = sigmoid_rampup(epoch, rampup)
  loss = ce_branches + ce_ensemble + weight * kl
  return loss, {"ce_branches": ce_branches, "ce_ensemble": ce_ensemble, "kl": kl,
                "kl_weight": weight, "loss": loss}


# ----------------------------------------------------------------------------- CL-ILR
# The OKDDip code's CL (DefangChen/OKDDip: models/model_cifar/resnet_one.py with avg=True,
# bpscale; train_one.py --avg; utils.KL_Loss), transcribed with its tensors as it lays them
# out: `pro` [N, C, B], the targets x_m [N, C, B]. MCL-OKD's variant: detach, weights 0.5.


class ILR(torch.autograd.Function):  # pylint: disable=abstract-method
  """Identity forward, gradient / B backward (resnet_one.py's ILR)."""

  @staticmethod
  def forward(ctx, x, num_branches):  # pylint: disable=arguments-differ
    ctx.num_branches = num_branches
    return x

  @staticmethod
  def backward(ctx, grad_output):  # pylint: disable=arguments-differ
    return grad_output / ctx.num_branches, None


class KLLossT(nn.Module):
  """utils.KL_Loss: T^2 * KLDiv(log_softmax(s/T), softmax(t/T) + 1e-7), batchmean; the
  target is NOT detached."""

  def __init__(self, temperature):
    super().__init__()
    self.T = temperature

  def forward(self, output_batch, teacher_outputs):
    output_batch = F.log_softmax(output_batch / self.T, dim=1)
    teacher_outputs = F.softmax(teacher_outputs / self.T, dim=1) + TEACHER_EPS
    return self.T * self.T * nn.KLDivLoss(reduction="batchmean")(output_batch, teacher_outputs)


def cl_targets(pro):
  """resnet_one.py's avg branch: x_m[:, :, i] = sum_{j != i} 1/(B-1) * pro[:, :, j]."""
  num_branches = pro.shape[2]
  x_m = 0
  for i in range(1, num_branches):
    x_m += 1 / (num_branches - 1) * pro[:, :, i]
  x_m = x_m.unsqueeze(-1)
  for i in range(1, num_branches):
    temp = 0
    for j in range(0, num_branches):
      if j != i:
        temp += 1 / (num_branches - 1) * pro[:, :, j]
    x_m = torch.cat([x_m, temp.unsqueeze(-1)], -1)
  return x_m


class CL_ResNet(_Trunk):  # pylint: disable=invalid-name
  """The OKDDip code's CL ResNet (resnet_one.py with avg=True, bpscale=True): the reference
  trunk, ILR at the branch point, B branches without a gate, the reference's module names.

  forward -> `pro` [N, C, B], as resnet_one.py returns it (its targets come from cl_targets).
  """

  def __init__(self, depth, num_classes=10, num_branches=3, bpscale=True):
    super().__init__()
    self._build_branches(depth, num_classes, num_branches)
    self.bpscale = bpscale

  def forward(self, x):
    x = self.trunk(x)
    if self.bpscale:
      x = ILR.apply(x, self.num_branches)
    return self._branch_logits(x, dim=-1)


def cl_loss_terms(pro, labels, consistency_weight, temperature=3.0, alpha=1.0, ce_weight=1.0,
                  detach=False):
  """(loss, terms) of train_one.py's loop with --avg: per branch CE(z_i) into loss_true and
  KL_T(z_i, x_m_i) into loss_group; loss = c * loss_true + alpha * w * loss_group."""
  x_m = cl_targets(pro)
  if detach:
    x_m = x_m.detach()
  criterion_t = KLLossT(temperature)
  ces, loss_group = [], 0
  for i in range(pro.shape[2]):
    ces.append(F.cross_entropy(pro[:, :, i], labels))
    loss_group += criterion_t(pro[:, :, i], x_m[:, :, i])
  loss = ce_weight * sum(ces) + alpha * consistency_weight * loss_group
  return loss, {"ce_branches": [c.detach() for c in ces], "kl": loss_group.detach(),
                "kl_weight": consistency_weight}


def cl_loss(pro, labels, consistency_weight, temperature=3.0, alpha=1.0, ce_weight=1.0,
            detach=False):
  """train_one.py's loss with --avg: sum_i CE(z_i) + alpha * w * sum_i KL_T(z_i, x_m_i)
  (ce_weight and detach for MCL-OKD's form)."""
  x_m = cl_targets(pro)
  if detach:
    x_m = x_m.detach()
  criterion_t = KLLossT(temperature)
  loss_true, loss_group = 0, 0
  for i in range(pro.shape[2]):
    loss_true += F.cross_entropy(pro[:, :, i], labels)
    loss_group += criterion_t(pro[:, :, i], x_m[:, :, i])
  return ce_weight * loss_true + alpha * consistency_weight * loss_group


def okddip_heads(peer_features, peer_logits, leader_logits, query_weight, key_weight):
  """resnet_GL.py's forward after the pooled features (en=False): peers' q and k by the shared
  bias-free projections, energy = bmm(q, k^T), attention = softmax over the last axis,
  x_m = bmm(pro, attention^T). peer_features / peer_logits: lists of [N, F] / [N, C];
  query_weight, key_weight: nn.Linear(F, F // 8, bias=False). Returns (pro [N, C, P],
  x_m [N, C, P], x_stu [N, C]) as the model does."""
  proj_q = torch.cat([query_weight(h)[:, None, :] for h in peer_features], 1)
  proj_k = torch.cat([key_weight(h)[:, None, :] for h in peer_features], 1)
  pro = torch.cat([z.unsqueeze(-1) for z in peer_logits], -1)
  energy = torch.bmm(proj_q, proj_k.permute(0, 2, 1))
  attention = F.softmax(energy, dim=-1)
  x_m = torch.bmm(pro, attention.permute(0, 2, 1))
  return pro, x_m, leader_logits


def okddip_loss(pro, x_m, x_stu, labels, consistency_weight, temperature=3.0, alpha=1.0,
                detach=False):
  """train_GL.py's loss: sum_i CE(peer i) + CE(leader) + alpha * w * (sum_i KL_T(peer i,
  x_m_i) + KL_T(leader, mean of the peers)); nothing detached there (detach: every target a
  constant, the option one_jax adds)."""
  target = (lambda t: t.detach()) if detach else (lambda t: t)
  criterion_t = KLLossT(temperature)
  loss_true, loss_group = 0, 0
  for i in range(pro.shape[2]):
    loss_true += F.cross_entropy(pro[:, :, i], labels)
    loss_group += criterion_t(pro[:, :, i], target(x_m[:, :, i]))
  return (loss_true + F.cross_entropy(x_stu, labels) + alpha * consistency_weight
          * (loss_group + criterion_t(x_stu, target(torch.mean(pro, dim=2)))))


class DMLGroup(nn.Module):
  """DML's B independent reference ResNets (MutualNet of the OKDDip code, models/model_cifar/
  DML.py, with the reference's CIFAR ResNet); forward -> [B] logits [N, C]."""

  def __init__(self, depth, num_classes=10, num_branches=3):
    super().__init__()
    self.peers = nn.ModuleList([ResNet(depth, num_classes) for _ in range(num_branches)])

  def forward(self, x):
    return [peer(x) for peer in self.peers]


def dml_okddip_loss(pro, labels, temperature=3.0, pairwise=False):
  """train_DML.py's loss (no ramp-up, nothing detached): sum_j CE(z_j) + either
  sum_j sum_{k != j} 1/(B-1) KL_T(z_j, z_k) (--type) or sum_j KL_T(z_j, mean_{k != j} z_k).
  pro: [N, C, B] as MutualNet returns it."""
  criterion_t = KLLossT(temperature)
  num_branches = pro.shape[2]
  loss = F.cross_entropy(pro[:, :, 0], labels)
  for kk in range(1, num_branches):
    loss += F.cross_entropy(pro[:, :, kk], labels)
  if pairwise:
    for j in range(num_branches):
      for k in range(num_branches):
        if k != j:
          loss += 1 / (num_branches - 1) * criterion_t(pro[:, :, j], pro[:, :, k])
  else:
    for j in range(num_branches):
      en_output = 0
      for k in range(num_branches):
        if k != j:
          en_output += pro[:, :, k]
      loss += criterion_t(pro[:, :, j], en_output / (num_branches - 1))
  return loss


def dml_mcl_okd_loss(logits, labels, temperature=2.0):
  """MCL-OKD's main_cifar_dml.py: sum_i CE(z_i) + sum_i sum_{j != i} DistillKL_T(z_i,
  z_j.detach()) / (B - 1); its DistillKL has no 1e-7 on the teacher."""
  loss_cls, loss_div = 0., 0.
  for i in range(len(logits)):
    loss_cls = loss_cls + F.cross_entropy(logits[i], labels)
    for j in range(len(logits)):
      if i != j:
        p_s = F.log_softmax(logits[i] / temperature, dim=1)
        p_t = F.softmax(logits[j].detach() / temperature, dim=1)
        loss_div = loss_div + F.kl_div(p_s, p_t, reduction="batchmean") * temperature ** 2 / (
            len(logits) - 1)
  return loss_cls + loss_div


def dml_loss_terms(logits, labels, consistency_weight, temperature=1.0):
  """The DML paper's loss in the reference's KL (KLLossT: + 1e-7 on the teacher), as one_jax's
  default computes it: sum_b CE(z_b) + w * sum_b mean_{j != b} KL_T(z_b, z_j.detach())."""
  criterion_t = KLLossT(temperature)
  ces, kl = [], 0
  for b, z in enumerate(logits):
    ces.append(F.cross_entropy(z, labels))
    others = [j for j in range(len(logits)) if j != b]
    kl += sum(criterion_t(z, logits[j].detach()) for j in others) / len(others)
  loss = sum(ces) + consistency_weight * kl
  return loss, {"ce_branches": [c.detach() for c in ces], "kl": kl.detach(),
                "kl_weight": consistency_weight}


def kdcl_loss(out_list, label, temperature=4.0, alpha=0.5):
  """The KDCL reproduction's train.py (naive ensemble): stable_out = the detached mean of all
  peers' logits; each peer (1 - alpha) CE + alpha T^2 KLDiv(log_softmax(z/T), softmax(
  stable_out/T)), batchmean, stepped by its own optimizer: the sum of the peers' losses has
  each peer's gradient."""
  stable_out = torch.stack(out_list).mean(dim=0).detach()
  total = 0
  for out in out_list:
    ce_loss = F.cross_entropy(out, label)
    div_loss = F.kl_div(F.log_softmax(out / temperature, dim=1),
                        F.softmax(stable_out / temperature, dim=1),
                        reduction="batchmean") * temperature * temperature
    total = total + (1 - alpha) * ce_loss + alpha * div_loss
  return total


class FusionModule(nn.Module):
  """FFL-pytorch's our_network.Fusion_module for B branches (the code's has 2): the feature
  maps concatenated on channels, depthwise 3x3 conv + BN + ReLU, 1x1 conv + BN + ReLU, average
  pool, Linear ('fc2')."""

  def __init__(self, channel, num_classes, num_branches=2):
    super().__init__()
    width = channel * num_branches
    self.fc2 = nn.Linear(channel, num_classes)
    self.conv1 = nn.Conv2d(width, width, kernel_size=3, stride=1, padding=1, groups=width,
                           bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv1_1 = nn.Conv2d(width, channel, kernel_size=1, groups=1, bias=False)
    self.bn1_1 = nn.BatchNorm2d(channel)

  def forward(self, *maps):
    x = torch.cat(maps, 1)
    x = F.relu(self.bn1(self.conv1(x)))
    x = F.relu(self.bn1_1(self.conv1_1(x)))
    x = F.adaptive_avg_pool2d(x, 1).flatten(1)
    return self.fc2(x)


def ffl_loss(outputs, fused_logit, targets, consistency_weight):
  """train_FFL.py's loss for any number of branches (the code writes out two): CE of every
  branch and of the fused logit, plus w * (sum_b KL(z_b, fused) + KL(fused, mean_b z_b)) with
  its KLLoss (T 3, + 1e-7 on the target, the target detached)."""
  def kl(pred, label, temperature=3.0):
    predict = F.log_softmax(pred / temperature, dim=1)
    target = (F.softmax(label / temperature, dim=1) + 10 ** (-7)).detach()
    return temperature * temperature * ((target * (target.log() - predict)).sum(1).sum()
                                        / target.size()[0])
  ensemble_logit = sum(outputs) / len(outputs)
  loss_cross = sum(F.cross_entropy(z, targets) for z in outputs) + F.cross_entropy(
      fused_logit, targets)
  loss_kl = consistency_weight * (sum(kl(z, fused_logit) for z in outputs)
                                  + kl(fused_logit, ensemble_logit))
  return loss_cross + loss_kl


# ----------------------------------------------------------------------------- PCL
# The PCL reproduction (shaoeric/Peer-Collaborative-Learning-for-Online-Knowledge-Distillation):
# src/losses/kd_loss.py (KDLoss, PMLoss), src/losses/loss_wrapper.py (written there for three
# peers; the same for B), src/models/resnet.py (en_fc on the concatenated features),
# src/utils/ema.py.


class PclKDLoss(nn.Module):
  def __init__(self, temperature=3.0):
    super().__init__()
    self.temperature = temperature
    self.func = nn.KLDivLoss(reduction="batchmean")

  def forward(self, pred, target):
    return self.func(F.log_softmax(pred / self.temperature, dim=1),
                     F.softmax(target / self.temperature, dim=1)) * self.temperature ** 2


class PclPMLoss(nn.Module):
  def __init__(self, temperature=3.0):
    super().__init__()
    self.kd = PclKDLoss(temperature)

  def forward(self, pred, targets):
    loss = 0
    for target in targets:
      loss += self.kd(pred, target.detach())
    return loss / len(targets)


def pcl_loss(preds, pred_en, mean_labels, label, rampup_weight, temperature=3.0):
  """LossWrapper.forward (ema=False) for B peers: en_label = pred_en.detach() (the
  controller's), the peers' temporal-mean outputs mean_labels; the ramp-up weight given (the
  reproduction's own divides by 1: one_jax uses ONE's)."""
  ce, kd, pm = nn.CrossEntropyLoss(), PclKDLoss(temperature), PclPMLoss(temperature)
  en_label = pred_en.detach()
  loss = ce(pred_en, label)
  for b, pred in enumerate(preds):
    others = [m for j, m in enumerate(mean_labels) if j != b]
    loss = loss + ce(pred, label) + kd(pred, en_label) * rampup_weight + pm(
        pred, others) * rampup_weight
  return loss


def pcl_fusion(features, en_fc):
  """resnet.py's peer-ensemble teacher: en_fc(torch.cat([feat1, ..., featB], dim=1))."""
  return en_fc(torch.cat(features, dim=1))


def update_ema_variables(model, ema_model, alpha=0.999, global_step=-1):
  """src/utils/ema.py, verbatim but for the deprecated add_ signature."""
  alpha = min(1 - 1 / (global_step + 1), alpha)
  for ema_param, param in zip(ema_model.parameters(), model.parameters()):
    ema_param.data.mul_(alpha).add_(param.data, alpha=1 - alpha)


def sgd(model, lr=0.1, momentum=0.9, weight_decay=5e-4):
  """The reference optimizer: coupled L2 decay on every parameter."""
  return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def adjust_learning_rate(optimizer, lr, epoch, milestones, gamma=0.1):
  """The reference's adjust_learning_rate, called at the start of every (0-based) epoch.

  `lr` is the current learning rate (the reference keeps it in its global `state['lr']`); at a
  milestone epoch it is multiplied by gamma before that epoch's first step. Returns the new lr.
  """
  if epoch in milestones:
    lr *= gamma
    for group in optimizer.param_groups:
      group["lr"] = lr
  return lr


def train_step_terms(model, optimizer, images, targets, epoch, rampup=80.0) -> Dict:
  """One reference training step (ONE or baseline) as the reference's train() runs it.

  The loss is built as the reference builds it (the CE terms, then the weighted KL sum),
  zero_grad, backward, optimizer.step(). Returns the loss terms (detached): 'ce_branches'
  (a list, one per branch), 'ce_ensemble', 'kl' (the unweighted sum), 'kl_weight' and 'loss';
  'ce' and 'loss' for the baseline.
  """
  model.train()
  if isinstance(model, CL_ResNet):
    loss, terms = cl_loss_terms(model(images), targets, sigmoid_rampup(epoch, rampup))
  elif isinstance(model, DMLGroup):
    loss, terms = dml_loss_terms(model(images), targets, sigmoid_rampup(epoch, rampup))
  elif isinstance(getattr(model, "_orig_mod", model), ONE_ResNet):   # torch.compile'd too
    logits, _, ensemble = model(images)
    ces = [F.cross_entropy(z, targets) for z in logits]
    ce_ensemble = F.cross_entropy(ensemble, targets)
    kl = sum(kl_loss(z, ensemble) for z in logits)
    weight = sigmoid_rampup(epoch, rampup)
    loss = sum(ces) + ce_ensemble + weight * kl
    terms = {"ce_branches": [c.detach() for c in ces], "ce_ensemble": ce_ensemble.detach(),
             "kl": kl.detach(), "kl_weight": weight}
  else:
    loss = F.cross_entropy(model(images), targets)
    terms = {"ce": loss.detach()}
  optimizer.zero_grad()
  loss.backward()
  optimizer.step()
  terms["loss"] = loss.detach()
  return terms


def train_step(model, optimizer, images, targets, epoch, rampup=80.0):
  """One reference training step (ONE or baseline); returns the loss tensor (detached)."""
  return train_step_terms(model, optimizer, images, targets, epoch, rampup)["loss"]


# ----------------------------------------------------------------------------- data
# The reference's CIFAR transforms (torchvision's documented semantics in torch ops:
# torchvision cannot be installed beside every torch build). Images are uint8 HWC arrays.

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)
CROP_PADDING = 4


def crop_flip_normalize(image_hwc, top: int, left: int, flip: bool) -> torch.Tensor:
  """RandomCrop(size, padding=4) -> RandomHorizontalFlip -> ToTensor -> Normalize, given draws.

  RandomCrop pads the uint8 image with zeros (fill=0, padding_mode='constant') and crops at
  row `top`, column `left` of the padded image; hflip mirrors the columns; ToTensor divides by
  255 (CHW float32); Normalize subtracts the mean and divides by the std per channel.
  """
  img = torch.as_tensor(image_hwc).permute(2, 0, 1)
  h, w = img.shape[1:]
  img = F.pad(img, (CROP_PADDING,) * 4, mode="constant", value=0)
  img = img[:, top:top + h, left:left + w]
  if flip:
    img = img.flip(-1)
  x = img.to(torch.float32).div(255)
  return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def train_transform(image_hwc, generator=None) -> torch.Tensor:
  """The reference's training transform with torchvision's draws: RandomCrop.get_params takes
  top = randint(0, 2p + 1) then left = randint(0, 2p + 1); the flip happens if rand(1) < 0.5."""
  top = int(torch.randint(0, 2 * CROP_PADDING + 1, (1,), generator=generator))
  left = int(torch.randint(0, 2 * CROP_PADDING + 1, (1,), generator=generator))
  flip = bool(torch.rand(1, generator=generator) < 0.5)
  return crop_flip_normalize(image_hwc, top, left, flip)


def test_transform(image_hwc) -> torch.Tensor:
  """ToTensor -> Normalize."""
  x = torch.as_tensor(image_hwc).permute(2, 0, 1).to(torch.float32).div(255)
  return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
