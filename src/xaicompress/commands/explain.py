from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from xaicompress.checkpoint import check_data_fits, load_checkpoint
from xaicompress.cli_app import CkptDataOpt, SeedOpt, TrustOpt, app, runtime_options
from xaicompress.data import DEFAULT_SPEC, load_dataset
from xaicompress.device import current_device
from xaicompress.pipeline.config import MAX_BATCH, MAX_SAMPLES
from xaicompress.relevance.explain import explain_checkpoint


@app.command("explain")
@runtime_options(amp=False)
def explain_cmd(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint file.")],
    model: TrustOpt = None,
    data: CkptDataOpt = None,
    criterion: Annotated[str, typer.Option(
        "--criterion", help="name[:key=value,...], e.g. deeplift:reference=mean,target=pred,"
        "aggregate=signed or deeplift:reference=samples:8")] = "deeplift",
    samples: Annotated[int, typer.Option("--samples", min=1, max=MAX_SAMPLES,
                                         help="Training images scored.")] = 512,
    images: Annotated[int, typer.Option("--images", min=0, max=64, help="Test images shown "
                                        "as heatmaps.")] = 8,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, max=MAX_BATCH,
                                            help="Images per relevance batch.")] = 128,
    seed: SeedOpt = 0,
    out: Annotated[str, typer.Option("--out", help="Output folder.")] = "explain",
) -> None:
    """Relevance of every unit and weight: scores (safetensors), bar plots, heatmaps."""
    from xaicompress.relevance import get_criterion

    crit = get_criterion(criterion)  # a bad spec fails before any loading
    ckpt = load_checkpoint(checkpoint, model=model)
    ckpt.model.to(current_device())  # loaded on the CPU; relevance runs on --device
    spec = data or ckpt.data or DEFAULT_SPEC
    bundle = load_dataset(spec, seed=seed, preprocess=ckpt.spec.preprocess)
    check_data_fits(ckpt, bundle.input_shape, bundle.num_classes, spec)
    result = explain_checkpoint(ckpt, bundle, out, criterion=crit, samples=samples, seed=seed,
                                images=images, batch_size=batch_size)
    meta = result.relevance.meta
    line = f"{criterion} on {meta.get('samples')} samples of {spec}"
    if "convergence_delta_rel" in meta:
        line += f", convergence delta {meta['convergence_delta_rel']:.1e} (relative)"
    Console().print(f"{line} -> {out}/ ({len(result.files)} files)")
