"""Two ranks (gloo, CPU) give the single-process relevance over the same samples."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from xaicompress.relevance import AccumulatingCriterion, register_criterion


@register_criterion("test-dist-output-mean")
class OutputMean(AccumulatingCriterion):
    """A user criterion that never mentions torch.distributed: the base class reduces."""

    provides = frozenset({"units"})

    def setup(self, model, loader, sums, need):
        layers = super().setup(model, loader, sums, need)

        def hook(name):
            return lambda mod, inp, out: sums.add(f"units/{name}", out.detach().abs().flatten(
                2).mean(2).sum(0) if out.dim() > 2 else out.detach().abs().sum(0))

        return model, [layer.register_forward_hook(hook(n)) for n, layer in layers.items()]

    def accumulate(self, state, x, y, sums):
        with torch.no_grad():
            state[0](x)

    def teardown(self, state):
        for h in state[1]:
            h.remove()


CRITERIA = ["deeplift:reference=mean", "gradxact", "taylor", "activation",
            "test-dist-output-mean"]


def _score():
    from xaicompress.data import load_dataset
    from xaicompress.models import create_model
    from xaicompress.relevance import compute_relevance, get_criterion

    torch.manual_seed(0)
    bundle = load_dataset("digits")
    model = create_model("lenet5", bundle.input_shape, bundle.num_classes).eval()
    return {c: compute_relevance(model, get_criterion(c), bundle, samples=32, batch_size=8,
                                 seed=3) for c in CRITERIA}


def _worker(rank, world, store_path, out_dir):
    os.environ["XAICOMPRESS_NO_PROGRESS"] = "1"
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        rels = _score()
        if rank == 0:
            torch.save({c: (r.units, r.weights, r.meta["samples"]) for c, r in rels.items()},
                       os.path.join(out_dir, "dist.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "dist.pt")
    single = _score()
    for c, rel in single.items():
        units, weights, n = got[c]
        assert n == rel.meta["samples"] == 32  # each rank scored 16: sums were reduced
        for k in rel.units:
            torch.testing.assert_close(units[k], rel.units[k], rtol=1e-5, atol=1e-9)
        for k in rel.weights:
            torch.testing.assert_close(weights[k], rel.weights[k], rtol=1e-5, atol=1e-9)
