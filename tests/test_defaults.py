"""One declaration per option: every option's default is the same on the CLI (typer), in
the config model (pydantic) and in the library step (its signature), and every number the
CLI takes has a documented range."""

from __future__ import annotations

import inspect

import pytest
from typer.main import get_command

from xaicompress.cli import _load_commands
from xaicompress.cli_app import app
from xaicompress.pipeline.config import (
    FinetuneStage,
    PruneStructuredStage,
    PruneUnstructuredStage,
    QuantizeStage,
    ShareStage,
    TrainConfig,
)
from xaicompress.prune.structured import prune_structured
from xaicompress.prune.unstructured import prune_unstructured
from xaicompress.quant.codebook import finetune_shared, share_weights
from xaicompress.quant.integer import quantize
from xaicompress.quant.qat import qat_train
from xaicompress.train import finetune_checkpoint, train_checkpoint

NOT_OPTIONS = {"type", "name", "criterion"}  # the stage's identity; criterion is positional
#: model -> (library functions it runs, fields whose None means "that function's own
#: default": the finetune stage runs one of three trainings, each with its own)
LIBRARY = {
    PruneStructuredStage: ([prune_structured], set()),
    PruneUnstructuredStage: ([prune_unstructured], set()),
    ShareStage: ([share_weights], set()),
    QuantizeStage: ([quantize], set()),
    TrainConfig: ([train_checkpoint], set()),
    FinetuneStage: ([finetune_checkpoint, finetune_shared, qat_train], {"lr", "batch_size"}),
}
#: the same setting under another name in a function a step calls
RENAMED = [(QuantizeStage, "qat_lr", qat_train, "lr")]
#: command -> {mode: model}
COMMANDS = {
    "prune": {"--structured": PruneStructuredStage, "--unstructured": PruneUnstructuredStage},
    "share": {None: ShareStage}, "quantize": {None: QuantizeStage},
    "finetune": {None: FinetuneStage}, "train": {None: TrainConfig},
}


def _model_defaults(model) -> dict:
    return {n: f.get_default(call_default_factory=True) for n, f in model.model_fields.items()
            if n not in NOT_OPTIONS}


def _cli_params(command: str) -> dict:
    _load_commands()
    group = get_command(app)
    return {p.name: p for p in group.commands[command].params}


@pytest.mark.parametrize("model", list(LIBRARY), ids=lambda m: m.__name__)
def test_config_default_equals_library_default(model):
    functions, own = LIBRARY[model]
    seen = set()
    for fn in functions:
        params = inspect.signature(fn).parameters
        for name, default in _model_defaults(model).items():
            if name not in params:
                continue
            seen.add(name)
            if name in own and default is None:
                continue
            assert params[name].default == default, (fn.__name__, name, params[name].default,
                                                     default)
    # every option reaches the library under its own name (nothing is renamed on the way)
    assert seen == set(_model_defaults(model)), set(_model_defaults(model)) - seen


@pytest.mark.parametrize("model, field, fn, param", RENAMED,
                         ids=[f"{m.__name__}.{f}" for m, f, _, _ in RENAMED])
def test_renamed_settings_agree(model, field, fn, param):
    assert model.model_fields[field].default == inspect.signature(fn).parameters[param].default


@pytest.mark.parametrize("command", list(COMMANDS))
def test_cli_default_equals_config_default(command):
    params = _cli_params(command)
    models = COMMANDS[command]
    fields = {n for m in models.values() for n in _model_defaults(m)} | (
        {"criterion"} if command != "train" and command != "finetune" else set())
    for name in fields:
        assert name in params, (command, name)
        per_mode = {mode: _model_defaults(m).get(name, m.model_fields.get(name) and
                                                 m.model_fields[name].default)
                    for mode, m in models.items() if name in m.model_fields}
        values = {repr(v) for v in per_mode.values()}
        if len(values) == 1:
            assert params[name].default == next(iter(per_mode.values())), (command, name)
        else:  # the modes differ: the CLI defers to the mode's model and says so
            assert params[name].default is None
            assert all(str(v) in params[name].help for v in per_mode.values()), name


def _is_number(param) -> bool:
    import typing

    ann = param.type_descriptor.annotation
    args = typing.get_args(ann) or (ann,)
    return any(a in (int, float) for a in args) and not getattr(param, "is_flag", False)


@pytest.mark.parametrize("command", ["train", "evaluate", "explain", "prune", "share",
                                     "quantize", "finetune", "export", "compress", "compare",
                                     "demo"])
def test_every_cli_number_has_a_documented_range(command):
    for name, p in _cli_params(command).items():
        if not _is_number(p):
            continue
        ranged = p.min is not None or p.max is not None or "<= x" in (p.help or "") or \
            "< x" in (p.help or "")
        assert ranged, (command, name, p.help)


def test_prune_mode_options_are_refused_with_the_other_mode(tmp_path, run_cli):
    code, _, err = run_cli("prune", tmp_path / "m.safetensors", "--unstructured",
                           "--min-channels", "2")
    assert code == 2 and "--min-channels: does not apply to prune --unstructured" in err


def test_registry_refuses_a_silent_overwrite():
    from xaicompress.pipeline.stages import STAGES, register_stage

    before = STAGES["share"]
    with pytest.raises(ValueError, match="already registered"):
        register_stage(ShareStage)(lambda *a: None)
    assert STAGES["share"] is before
