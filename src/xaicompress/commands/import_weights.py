"""`xaicompress import WEIGHTS --model SPEC --data SPEC --out ckpt.safetensors`."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console

from xaicompress.atomic import check_writable
from xaicompress.checkpoint import save_checkpoint
from xaicompress.cli_app import DataOpt, SeedOpt, app, model_options, validate_options
from xaicompress.errors import XaiCompressError
from xaicompress.pipeline.config import PreprocessConfig


def parse_model_kwargs(text: str | None) -> dict[str, Any]:
    """`--model-kwargs '{"width_mult": 0.5}'`: a JSON object of constructor options."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise XaiCompressError(f"--model-kwargs {text[:80]!r}: not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise XaiCompressError(f"--model-kwargs {text[:80]!r}: expected a JSON object such as "
                               "'{\"width_mult\": 0.5}'")
    return value


@app.command("import")
@model_options({None: PreprocessConfig}, panel="Preprocessing (how the model was trained)")
def import_cmd(
    weights: Annotated[str, typer.Argument(help="Your trained state dict: .pt / .pth / .bin "
                                           "(torch.save, read with weights_only=True) or "
                                           ".safetensors.")],
    options: dict[str, Any],
    model: Annotated[str, typer.Option("--model", help="Its architecture: a registered name, "
                                       "torchvision:NAME, timm:NAME or package.module:factory "
                                       "(your code, which this runs).")],
    model_kwargs: Annotated[str | None, typer.Option(
        "--model-kwargs", help="Constructor options as a JSON object, e.g. "
        "'{\"width_mult\": 0.5}' (num_classes and channels come from the data).")] = None,
    data: DataOpt = "mnist5k",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    seed: SeedOpt = 0,
    out: Annotated[str, typer.Option("--out", help="Checkpoint to write.")]
    = "model.safetensors",
) -> None:
    """Import your own trained model: check it fits the architecture, evaluate it on the
    data (its test accuracy should be your own number) and write a checkpoint that records
    the architecture and the preprocessing for every later command."""
    from xaicompress.importing import import_weights

    cfg = validate_options(PreprocessConfig, options, command="import")
    kwargs = parse_model_kwargs(model_kwargs)
    check_writable(out)
    ckpt, bundle = import_weights(weights, model, data, model_kwargs=kwargs,
                                  preprocess=cfg.preprocess(), seed=seed)
    save_checkpoint(ckpt, out)
    acc = ckpt.metrics["accuracy"]
    pre = ckpt.spec.preprocess
    if as_json:
        print(json.dumps({"accuracy": acc, "test_images": len(bundle.test),  # type: ignore[arg-type]
                          "model": ckpt.spec.to_meta(), "out": out}, indent=2))
        return
    Console().print(f"{weights} as {model} on {data}: test accuracy {acc:.2f}% on "
                    f"{len(bundle.test)} images ({pre.describe() if pre else ''}) -> {out}")  # type: ignore[arg-type]
