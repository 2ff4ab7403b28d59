"""Linear probe on frozen features (the DINOv2 linear evaluation, Oquab et al. 2023, section 7; DINO v1 eval_linear).

Many linear classifiers are trained at once on the cached features: one per (feature choice, learning rate).
A feature choice is "CLS of the last n blocks, with or without the average-pooled patch tokens". All heads of one
choice live in a single stacked weight (L, D, C), so a step is one batched matmul:

    logits (L, B, C) = bias (L, 1, C) + x (B, D) @ W (L, D, C)

Optimiser as in the reference: SGD, momentum 0.9, no weight decay, cosine decay of each head's own learning rate
(lr * batch_size / 256) to 0 over a fixed number of iterations. The head with the best validation accuracy (ties:
lower validation loss) is selected; only that head is evaluated on the test split.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .features import FeatureSet


@dataclass(frozen=True)
class FeatureChoice:
    n_blocks: int
    avgpool: bool

    @property
    def name(self) -> str:
        return f"cls{self.n_blocks}" + ("+avgpool" if self.avgpool else "")


class StackedLinearHeads(nn.Module):
    """``n_heads`` independent linear classifiers of the same input: (B, D) -> (n_heads, B, C)."""

    def __init__(self, in_dim: int, n_classes: int, n_heads: int):
        super().__init__()
        # Reference init: weights N(0, 0.01), zero bias.
        self.weight = nn.Parameter(torch.randn(n_heads, in_dim, n_classes) * 0.01)
        self.bias = nn.Parameter(torch.zeros(n_heads, 1, n_classes))

    def forward(self, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias, x.unsqueeze(0).expand(self.weight.shape[0], -1, -1), self.weight)


def scaled_lr(lr: float, batch_size: int, rule: str) -> float:
    if rule == "linear_wrt_256":
        return lr * batch_size / 256.0
    if rule == "sqrt_wrt_256":
        return lr * math.sqrt(batch_size / 256.0)
    return lr


@dataclass
class LinearProbe:
    """Trained heads and their validation scores; `best` is the validation-selected head."""

    choices: List[FeatureChoice]
    learning_rates: List[float]  # as configured (before scaling)
    heads: nn.ModuleList  # one StackedLinearHeads per choice
    val_accuracy: Tensor  # (n_choices, n_lrs)
    val_loss: Tensor  # (n_choices, n_lrs)
    curves: Dict[str, List[float]] = field(default_factory=dict)  # of the best head
    iterations: int = 0

    @property
    def best(self) -> tuple:
        """(choice index, lr index) of the head with the best val accuracy; ties -> lowest val loss, then first."""
        acc = self.val_accuracy.flatten()
        candidates = torch.nonzero(acc == acc.max()).flatten()
        loss = self.val_loss.flatten()[candidates]
        flat = int(candidates[torch.argmin(loss)])  # argmin returns the first of equal minima
        return divmod(flat, len(self.learning_rates))

    def head_name(self, choice_index: int, lr_index: int) -> str:
        return f"{self.choices[choice_index].name} lr={self.learning_rates[lr_index]:g}"

    @torch.no_grad()
    def logits(self, features: FeatureSet, choice_index: int, lr_index: Optional[int] = None) -> Tensor:
        """Logits (N, C) of one head, or (L, N, C) of every lr of a choice when ``lr_index`` is None."""
        head = self.heads[choice_index]
        choice = self.choices[choice_index]
        x = features.linear_input(choice.n_blocks, choice.avgpool).to(head.weight.device)
        out = head(x)
        return out if lr_index is None else out[lr_index]

    def predict_proba(self, features: FeatureSet, choice_index: Optional[int] = None,
                      lr_index: Optional[int] = None) -> Tensor:
        """Class probabilities (N, C) of a head (default: the selected one)."""
        if choice_index is None:
            choice_index, lr_index = self.best
        return self.logits(features, choice_index, lr_index).softmax(-1).cpu()

    def selection_table(self) -> List[Dict[str, Any]]:
        rows = []
        for c, choice in enumerate(self.choices):
            for i, lr in enumerate(self.learning_rates):
                rows.append(dict(features=choice.name, lr=lr, val_accuracy=float(self.val_accuracy[c, i]),
                                 val_loss=float(self.val_loss[c, i])))
        return rows


def feature_choices(n_last_blocks: Sequence[int], avgpool: Sequence[bool], available_blocks: int,
                    has_patch_tokens: bool) -> List[FeatureChoice]:
    """The grid of feature choices this backbone can provide (blocks clipped to those extracted)."""
    choices = []
    for n in sorted({min(int(n), available_blocks) for n in n_last_blocks}):
        for pool in sorted(set(bool(p) for p in avgpool)):
            if pool and not has_patch_tokens:
                continue
            choices.append(FeatureChoice(n, pool))
    if not choices:
        raise ValueError("no feature choice is possible: avgpool only, but the backbone gives no patch tokens")
    return choices


def _evaluate_heads(heads: StackedLinearHeads, x: Tensor, y: Tensor, batch: int = 4096):
    """(accuracy (L,), mean CE loss (L,)) of every head on (x, y), in chunks."""
    correct, loss = 0, 0
    for start in range(0, x.shape[0], batch):
        logits = heads(x[start:start + batch])  # (L, b, C)
        target = y[start:start + batch]
        correct = correct + (logits.argmax(-1) == target).sum(1)
        loss = loss + F.cross_entropy(logits.transpose(1, 2), target.expand(logits.shape[0], -1),
                                      reduction="none").sum(1)
    return (correct.float() / x.shape[0]).cpu(), (loss / x.shape[0]).cpu()


@contextlib.contextmanager
def _cpu_threads_for(work: float, device: torch.device):
    """One intra-op thread for small CPU problems (restored afterwards): for matmuls of a few hundred thousand
    multiply-adds, thread synchronisation costs more than it saves, and a lot more on a busy machine."""
    if device.type != "cpu" or work > SMALL_PROBLEM_MACS:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


SMALL_PROBLEM_MACS = 2e7


def train_linear_probe(train: FeatureSet, val: FeatureSet, n_classes: int, cfg, *, seed: int = 0,
                       device: Any = "cpu", progress: bool = False, n_eval_points: int = 40) -> LinearProbe:
    """Train every (feature choice x learning rate) head on ``train``; score them on ``val``.

    ``cfg`` is the ``linear`` config section (learning_rates, lr_scaling, n_last_blocks, avgpool, iterations,
    batch_size, momentum, weight_decay).
    """
    device = torch.device(device)
    choices = feature_choices(cfg.n_last_blocks, cfg.avgpool, train.n_blocks, train.patch_mean is not None)
    dims = sum(train.linear_input(c.n_blocks, c.avgpool).shape[1] for c in choices)
    work = min(int(cfg.batch_size), len(train)) * dims * len(cfg.learning_rates) * n_classes
    with _cpu_threads_for(work, device):
        return _train_linear_probe(train, val, n_classes, cfg, choices, seed, device, progress, n_eval_points)


def _train_linear_probe(train: FeatureSet, val: FeatureSet, n_classes: int, cfg, choices: List[FeatureChoice],
                        seed: int, device: torch.device, progress: bool, n_eval_points: int) -> LinearProbe:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    lrs = [float(lr) for lr in cfg.learning_rates]
    batch = min(int(cfg.batch_size), len(train))
    head_lrs = torch.tensor([scaled_lr(lr, int(cfg.batch_size), cfg.lr_scaling) for lr in lrs], device=device)
    x_train = [train.linear_input(c.n_blocks, c.avgpool).to(device) for c in choices]
    x_val = [val.linear_input(c.n_blocks, c.avgpool).to(device) for c in choices]
    y_train, y_val = train.labels.to(device), val.labels.to(device)
    heads = nn.ModuleList(StackedLinearHeads(x.shape[1], n_classes, len(lrs)) for x in x_train).to(device)
    params = list(heads.parameters())
    momentum_buffers = [torch.zeros_like(p) for p in params]

    total = int(cfg.iterations)
    eval_at = set(torch.linspace(0, total, min(n_eval_points, total) + 1).round().long().tolist()[1:])
    history: Dict[str, List[Any]] = dict(iteration=[], train_loss=[], train_accuracy=[], val_loss=[],
                                         val_accuracy=[])
    running_loss = torch.zeros(len(choices), len(lrs), device=device)
    running_correct = torch.zeros(len(choices), len(lrs), device=device)
    running_n = 0
    order = torch.randperm(len(train), generator=generator)
    position = 0
    steps = range(1, total + 1)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="linear heads", unit="it", leave=False)
    for step in steps:
        if position + batch > len(train):  # new epoch: reshuffle
            order, position = torch.randperm(len(train), generator=generator), 0
        index = order[position:position + batch].to(device)
        position += batch
        target = y_train[index]
        loss = 0.0
        targets = target.repeat(len(lrs))  # (L * B,)
        for c, head in enumerate(heads):
            logits = head(x_train[c][index])  # (L, B, C)
            per_head = F.cross_entropy(logits.reshape(-1, n_classes), targets,
                                       reduction="none").view(len(lrs), -1).mean(1)  # (L,)
            loss = loss + per_head.sum()  # heads are independent: the sum gives each its own gradient
            running_loss[c] += per_head.detach()
            running_correct[c] += (logits.argmax(-1) == target).float().mean(1).detach()
        running_n += 1
        for p in params:
            p.grad = None
        loss.backward()
        # SGD with momentum, each head at its own lr, cosine-decayed per iteration (CosineAnnealingLR, eta_min 0)
        lr_factor = 0.5 * (1.0 + math.cos(math.pi * (step - 1) / total))
        with torch.no_grad():
            for p, buf in zip(params, momentum_buffers):
                grad = p.grad + cfg.weight_decay * p if cfg.weight_decay else p.grad
                buf.mul_(cfg.momentum).add_(grad)
                p.sub_(head_lrs.view(-1, *[1] * (p.dim() - 1)) * lr_factor * buf)
        if step in eval_at:
            with torch.no_grad():
                scores = [_evaluate_heads(h, x, y_val) for h, x in zip(heads, x_val)]
            history["iteration"].append(step)
            history["train_loss"].append((running_loss / running_n).cpu())
            history["train_accuracy"].append((running_correct / running_n).cpu())
            history["val_accuracy"].append(torch.stack([s[0] for s in scores]))
            history["val_loss"].append(torch.stack([s[1] for s in scores]))
            running_loss.zero_(), running_correct.zero_()
            running_n = 0
    probe = LinearProbe(choices, lrs, heads, history["val_accuracy"][-1], history["val_loss"][-1],
                        iterations=total)
    c, i = probe.best
    probe.curves = dict(iteration=history["iteration"],
                        **{k: [float(v[c, i]) for v in history[k]]
                           for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy")})
    return probe
