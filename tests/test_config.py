"""Pipeline config validation: every mistake is a one-line XaiCompressError naming the file
and the key; the shipped configs parse; arbitrary input never escapes as another error."""

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xaicompress.errors import XaiCompressError
from xaicompress.pipeline import load_config, parse_config_text, validate_config
from xaicompress.pipeline.config import PipelineConfig, stage_types

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GOOD = {
    "model": "lenet5", "data": "mnist5k", "seed": 3,
    "train": {"epochs": 2},
    "stages": [
        {"type": "prune_structured", "criterion": "deeplift", "ratio": 0.5, "steps": 2},
        {"type": "prune_unstructured", "criterion": "l1", "ratio": 0.9, "layers": "all"},
        {"type": "share", "criterion": "deeplift", "clusters": 16, "finetune_epochs": 1},
        {"type": "quantize", "criterion": "taylor", "avg_bits": 4, "act_bits": 8},
        {"type": "finetune", "epochs": 0.5, "lr": 1e-4},
    ],
}


def _err(data, source="cfg.yaml") -> str:
    with pytest.raises(XaiCompressError) as exc:
        validate_config(data, source)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(source), msg
    return msg


def test_good_config_parses_with_defaults():
    cfg = validate_config(GOOD)
    assert cfg.model is not None and cfg.model.name == "lenet5" and cfg.seed == 3
    assert [s.type for s in cfg.stages] == stage_types()
    assert cfg.stages[0].scope == "global" and cfg.stages[0].samples == 512
    assert cfg.stages[1].options() == {"samples": 512, "ratio": 0.9, "layers": "all",
                                       "scope": "global", "norm": "none",
                                       "finetune_epochs": 0, "bn_recalibration": True,
                                       "distill": 0.0}
    assert cfg.train.epochs == 2 and cfg.train.augment is None  # None: image height // 12
    assert cfg.export.packed and cfg.export.onnx


def test_model_with_kwargs_and_checkpoint_source():
    cfg = validate_config({"model": {"name": "vgg11", "kwargs": {"width": 0.25}}})
    assert cfg.model.kwargs == {"width": 0.25}
    cfg = validate_config({"checkpoint": "trained.safetensors", "stages": []})
    assert cfg.model is None and cfg.checkpoint == "trained.safetensors"
    assert cfg.trusted_model is None
    # model: next to checkpoint: names the factory of the user's own model (trusted)
    cfg = validate_config({"checkpoint": "mine.safetensors", "model": "mypkg.nets:build"})
    assert cfg.trusted_model == "mypkg.nets:build" and cfg.title().startswith("mine")


def test_train_epochs_zero_is_accepted_like_on_the_cli():
    assert validate_config({"model": "lenet5", "train": {"epochs": 0}}).train.epochs == 0
    _err({"model": "lenet5", "train": {"epochs": float("inf")}})
    _err({"model": "lenet5", "train": {"epochs": 1001}})


def test_yaml_alias_bomb_is_refused_before_expanding():
    import time

    levels = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
    text = "model: {name: lenet5, kwargs: {" + ", ".join(levels) + "}}"
    t0 = time.perf_counter()
    with pytest.raises(XaiCompressError, match="more than 100000 values"):
        parse_config_text(text, "bomb.yaml")
    assert time.perf_counter() - t0 < 2  # 9^9 values named; refused while composing
    # anchors a config uses sensibly still work
    ok = parse_config_text("model: lenet5\nstages:\n  - &p {type: prune_unstructured, "
                           "ratio: 0.5}\n  - *p\n", "ok.yaml")
    assert [s.ratio for s in ok.stages] == [0.5, 0.5]


@pytest.mark.parametrize("data, needles", [
    ({**GOOD, "stagez": []}, ["stagez", "unknown key", "stages"]),
    ({"model": "lenet5", "stages": [{"type": "share", "clusters": 4, "clusterz": 2}]},
     ["stages[0].clusterz", "unknown key", "avg_bits"]),
    ({"model": "lenet5", "train": {"epoch": 3}}, ["train.epoch", "unknown key", "epochs"]),
    ({"model": {"name": "lenet5", "kwarg": {}}}, ["model.kwarg", "unknown key"]),
    ({"model": "lenet5", "seed": "abc"}, ["seed", "integer"]),
    ({"model": "lenet5", "stages": {"type": "share"}}, ["stages", "list"]),
    ({"model": "lenet5", "train": {"epochs": "many"}}, ["train.epochs", "number"]),
    ({"model": "lenet5", "stages": [{"type": "prune_structured", "ratio": 1.0}]},
     ["stages[0].ratio", "less than 1"]),
    ({"model": "lenet5", "stages": [{"type": "prune_unstructured", "ratio": -0.1}]},
     ["stages[0].ratio", "greater than or equal to 0"]),
    ({"model": "lenet5", "stages": [{"type": "prune_structured", "ratio": float("nan")}]},
     ["stages[0].ratio", "finite"]),
    ({"model": "lenet5", "stages": [{"type": "quantize", "avg_bits": 0}]},
     ["stages[0].avg_bits", "greater than or equal to 2"]),
    ({"model": "lenet5", "stages": [{"type": "quantize", "avg_bits": -2}]},
     ["stages[0].avg_bits"]),
    ({"model": "lenet5", "stages": [{"type": "quantize", "avg_bits": 4, "act_bits": 0}]},
     ["stages[0].act_bits"]),
    ({"model": "lenet5", "stages": [{"type": "share", "clusters": 1}]},
     ["stages[0].clusters", "greater than or equal to 2"]),
    ({"model": "lenet5", "stages": [{"type": "share"}]}, ["stages[0]", "exactly one"]),
    ({"model": "lenet5", "stages": [{"type": "quantize", "avg_bits": 4, "size_kb": 3}]},
     ["stages[0]", "exactly one"]),
    ({"model": "lenet5", "stages": [{"type": "prune_sideways"}]},
     ["stages[0].type", "prune_sideways", "prune_structured"]),
    ({"model": "lenet5", "stages": [{"ratio": 0.5}]}, ["stages[0].type", "missing"]),
    ({"model": "lenet5", "stages": [{"type": "share", "clusters": 4, "criterion": "magic"}]},
     ["stages[0].criterion", "magic", "unknown criterion"]),
    ({"model": "lenet5", "stages": [{"type": "finetune", "criterion": "l1"}]},
     ["stages[0].criterion", "unknown key"]),
    ({"model": "nosuchnet"}, ["model.name", "nosuchnet"]),
    ({"model": "lenet5", "data": "floppy:/x"}, ["data", "floppy"]),
    ({}, ["give model", "or checkpoint"]),
    ({"checkpoint": "a.safetensors", "train": {"epochs": 1}}, ["train does not apply"]),
])
def test_bad_configs_name_the_key(data, needles):
    msg = _err(data)
    for n in needles:
        assert n in msg, (n, msg)


def test_yaml_errors_name_the_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("model: lenet5\nstages: [\n  {type: share\n")
    with pytest.raises(XaiCompressError, match=r"broken.yaml: not valid YAML at line \d+"):
        load_config(p)
    p.write_text("- just\n- a list\n")
    with pytest.raises(XaiCompressError, match="broken.yaml: expected a mapping"):
        load_config(p)
    with pytest.raises(XaiCompressError, match="missing.yaml: config file does not exist"):
        load_config(tmp_path / "missing.yaml")
    # safe_load: a Python-object tag is refused, never constructed
    p.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(XaiCompressError, match="not valid YAML"):
        load_config(p)


def test_with_criterion_and_seed():
    cfg = validate_config(GOOD).with_criterion("random").with_seed(7)
    crits = [getattr(s, "criterion", None) for s in cfg.stages]
    assert crits == ["random"] * 4 + [None] and cfg.seed == 7
    with pytest.raises(XaiCompressError, match="nonsense"):
        validate_config(GOOD).with_criterion("nonsense")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    text = path.read_text()
    if "mypkg" in text:  # the user-model example names a package that is not installed
        text = text.replace("mypkg.models:build", "lenet5")
    cfg = parse_config_text(text, str(path))
    assert isinstance(cfg, PipelineConfig) and cfg.stages


def test_cli_bad_config_exit_2_one_line(tmp_path, run_cli):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"model": "lenet5", "stages": [{"type": "prune_structured",
                                                                 "ratio": 1.5}]}))
    out = tmp_path / "out"
    code, stdout, err = run_cli("compress", "--config", p, "--out", out)
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "stages[0].ratio" in err and "c.yaml" in err
    assert not out.exists()


# ------------------------------------------------------------- property tests
_keys = st.sampled_from(["model", "data", "seed", "train", "stages", "export", "report",
                         "checkpoint", "type", "ratio", "criterion", "clusters", "avg_bits",
                         "epochs", "name", "kwargs", "samples", "bogus"]) | st.text(max_size=6)
_leaf = (st.none() | st.booleans() | st.integers(-5, 300) | st.floats(allow_nan=True)
         | st.text(max_size=12) | st.sampled_from(["lenet5", "mnist5k", "share", "deeplift",
                                                   "prune_structured", "quantize", "finetune"]))
_values = st.recursive(_leaf, lambda c: st.lists(c, max_size=4)
                       | st.dictionaries(_keys, c, max_size=5), max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _values, max_size=6))
def test_any_dict_parses_or_raises_our_error(data):
    try:
        cfg = validate_config(data, "prop.yaml")
    except XaiCompressError as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(cfg, PipelineConfig)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_any_text_parses_or_raises_our_error(text):
    try:
        parse_config_text(text, "prop.yaml")
    except XaiCompressError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.dictionaries(_keys, _values, max_size=5), max_size=3),
       st.sampled_from(stage_types()))
def test_any_stage_list_parses_or_raises_our_error(stages, kind):
    for s in stages:
        s.setdefault("type", kind)
    try:
        validate_config({"model": "lenet5", "stages": stages}, "prop.yaml")
    except XaiCompressError as exc:
        assert "\n" not in str(exc)
