"""Explanation fidelity: how far compression moved the model's explanations.

For a fixed set of test images, the input-space DeepLIFT maps (N, C, H, W) of the original
and of the compressed model are compared per image:
  cosine         cosine similarity of the flattened signed maps;
  top10_overlap  |top-10% pixels of one ∩ of the other| / (10% of the pixels), pixels ranked
                 by |map| summed over channels;
and on the whole test set, `agreement`: the share of images both models give the same class.

Both models explain the ORIGINAL model's predicted class, so the maps answer the same
question and a changed prediction does not masquerade as a changed explanation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from xaicompress.data import DatasetBundle, dataset_tensors, subset
from xaicompress.device import to_model_device
from xaicompress.relevance.inputmaps import input_attribution
from xaicompress.train import predict

TOP_FRACTION = 0.10


def input_maps(model: nn.Module, x: Tensor, target: Tensor, bundle: DatasetBundle) -> Tensor:
    """Input-space DeepLIFT maps (N, C, H, W) of `model` on x (N, C, H, W) for `target` (N,),
    against a black image (the reference of the relevance engine's default)."""
    model.eval()
    maps = input_attribution(model, x, target=target, pixel_mean=bundle.mean,
                             pixel_std=bundle.std)
    return maps.detach().float()


def map_similarity(a: Tensor, b: Tensor, top: float = TOP_FRACTION) -> tuple[Tensor, Tensor]:
    """Per-image cosine similarity (N,) and top-`top` pixel overlap (N,) of maps (N, C, H, W)."""
    fa, fb = a.reshape(len(a), -1).double(), b.reshape(len(b), -1).double()
    na, nb = fa.norm(dim=1), fb.norm(dim=1)
    both_zero = (na == 0) & (nb == 0)
    cos = (fa * fb).sum(1) / (na * nb).clamp_min(1e-30)
    cos = torch.where(both_zero, torch.ones_like(cos), cos)
    pa, pb = a.abs().sum(1).reshape(len(a), -1), b.abs().sum(1).reshape(len(b), -1)
    k = max(1, int(round(top * pa.shape[1])))
    ia, ib = pa.topk(k, dim=1).indices, pb.topk(k, dim=1).indices
    hit = torch.zeros_like(pa, dtype=torch.bool).scatter_(1, ia, True)
    overlap = hit.gather(1, ib).sum(1).double() / k
    return cos.float(), overlap.float()


@dataclass
class FidelityProbe:
    """The original model's side of the comparison, computed once per run.

    x: (N, C, H, W) test images; target: (N,) the original's predicted classes; maps:
    (N, C, H, W) its input maps; test_pred: (M,) its predictions on the whole test set.
    """

    bundle: DatasetBundle
    x: Tensor
    target: Tensor
    maps: Tensor
    test_pred: Tensor

    @classmethod
    def build(cls, original: nn.Module, bundle: DatasetBundle, samples: int,
              seed: int = 0) -> FidelityProbe:
        x, _ = dataset_tensors(subset(bundle.test, samples, seed=seed))
        logits, _ = predict(original, bundle.test)
        with torch.no_grad():
            target = original.eval()(to_model_device(x, original)).argmax(1).cpu()
        return cls(bundle, x, target, input_maps(original, x, target, bundle),
                   logits.argmax(1))

    def measure(self, model: nn.Module) -> dict[str, float]:
        """cosine / top10_overlap (means over the probe images) and agreement (%, test set)."""
        maps = input_maps(model, self.x, self.target, self.bundle)
        cos, overlap = map_similarity(self.maps, maps)
        logits, _ = predict(model, self.bundle.test)
        agree = float((logits.argmax(1) == self.test_pred).float().mean() * 100)
        return {"cosine": round(float(cos.mean()), 6),
                "top10_overlap": round(float(overlap.mean()), 6),
                "agreement": round(agree, 4), "samples": int(len(self.x))}
