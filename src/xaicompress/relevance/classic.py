"""Data-free criteria: weight magnitude (Li et al. 2017), random, and none (uniform).

They compute units and weights together whatever `need` asks for: both cost one pass over
the weights.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from xaicompress.relevance import options as opt
from xaicompress.relevance.base import Criterion, Need, Relevance, prunable_layers
from xaicompress.relevance.registry import register_criterion


@register_criterion("l1")
class L1(Criterion):
    """Per filter/neuron: L1 norm of its weights; per weight: |w|."""

    needs_data = False

    def score(self, model: nn.Module, loader: DataLoader | None = None,
              need: Need = None) -> Relevance:
        units, weights = {}, {}
        for name, m in prunable_layers(model).items():
            w = m.weight.detach().abs().float()
            weights[name] = w.clone()
            units[name] = w.reshape(w.shape[0], -1).sum(1)
        return Relevance(self.name, units, weights, {"criterion": self.name})


@register_criterion("random")
class Random(Criterion):
    """Uniform random scores from a seeded generator (option `seed`, default 0)."""

    needs_data = False
    seeded = True

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.seed = opt.seed(seed)

    def score(self, model: nn.Module, loader: DataLoader | None = None,
              need: Need = None) -> Relevance:
        g = torch.Generator().manual_seed(self.seed)
        units, weights = {}, {}
        for name, m in prunable_layers(model).items():
            weights[name] = torch.rand(m.weight.shape, generator=g)
            units[name] = torch.rand(m.weight.shape[0], generator=g)
        return Relevance(self.name, units, weights, {"criterion": self.name, "seed": self.seed})


@register_criterion("none")
class Uniform(Criterion):
    """Every unit and weight equally important: plain (unweighted) baselines."""

    needs_data = False

    def score(self, model: nn.Module, loader: DataLoader | None = None,
              need: Need = None) -> Relevance:
        units, weights = {}, {}
        for name, m in prunable_layers(model).items():
            weights[name] = torch.ones(m.weight.shape)
            units[name] = torch.ones(m.weight.shape[0])
        return Relevance(self.name, units, weights, {"criterion": self.name})
