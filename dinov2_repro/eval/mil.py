"""Gated attention multiple-instance learning (Ilse et al. 2018, "Attention-based deep multiple instance
learning"), in the single-branch form of CLAM (Lu et al. 2021): a slide is a bag of tile embeddings, the model
weighs its tiles and classifies the weighted mean.

  h_i = ReLU(W x_i)                                  (N, hidden)   tile features, projected
  a_i = w^T (tanh(V h_i) * sigmoid(U h_i))           (N,)          gated attention score
  alpha = softmax(a)                                 (N,)          weights over the bag's tiles
  logits = C (sum_i alpha_i h_i)                     (n_classes,)

The attention ``alpha`` is what a slide heatmap shows.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn


class GatedAttentionMIL(nn.Module):
    """Bag (N, in_dim) -> (logits (n_classes,), attention (N,) summing to 1)."""

    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 256, attention_dim: int = 128,
                 dropout: float = 0.25):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Sequential(nn.Linear(hidden, attention_dim), nn.Tanh(), nn.Dropout(dropout))
        self.attention_u = nn.Sequential(nn.Linear(hidden, attention_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.attention_w = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, bag: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if bag.ndim != 2 or bag.shape[0] == 0:
            raise ValueError(f"a bag is (N, features) with N >= 1, got {tuple(bag.shape)}")
        h = self.project(bag)
        scores = self.attention_w(self.attention_v(h) * self.attention_u(h)).squeeze(-1)
        attention = torch.softmax(scores, dim=0)
        return self.classifier(attention @ h), attention


def train_mil(bags: Sequence[torch.Tensor], labels: Sequence[int], n_classes: int = 2, epochs: int = 20,
              lr: float = 2e-4, weight_decay: float = 1e-5, seed: int = 0,
              model: Optional[GatedAttentionMIL] = None) -> GatedAttentionMIL:
    """Train on one bag at a time (bags differ in size), in a seeded order each epoch; CLAM's Adam defaults."""
    torch.manual_seed(seed)
    model = model or GatedAttentionMIL(int(bags[0].shape[1]), n_classes)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    order = torch.Generator().manual_seed(seed)
    targets = torch.as_tensor(list(labels), dtype=torch.long)
    model.train()
    for _ in range(epochs):
        for i in torch.randperm(len(bags), generator=order).tolist():
            logits, _ = model(bags[i].float())
            loss = nn.functional.cross_entropy(logits[None], targets[i: i + 1])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    return model.eval()


@torch.no_grad()
def predict_mil(model: GatedAttentionMIL, bags: Sequence[torch.Tensor]) -> Dict[str, List[torch.Tensor]]:
    """{"probabilities": [(n_classes,) per bag], "attention": [(N,) per bag]} in eval mode."""
    model.eval()
    probabilities, attention = [], []
    for bag in bags:
        logits, weights = model(bag.float())
        probabilities.append(torch.softmax(logits, dim=0))
        attention.append(weights)
    return {"probabilities": probabilities, "attention": attention}
