"""The pipeline config: one YAML file, validated by pydantic, every mistake a one-line error.

Shape (see configs/*.yaml for commented examples)::

    model: lenet5                  # registered name or package.module:factory
    # model: {name: vgg11, kwargs: {width: 0.5}}
    # checkpoint: path/to/trained.safetensors   # instead of model: start from a checkpoint
    data: mnist5k                  # any --data spec (idx:DIR, cifar10:DIR, folder:DIR, ...)
    seed: 0
    train: {epochs: 15, lr: 0.003, optimizer: adam, batch_size: 64, augment: 2}
    stages:                        # run in the order written
      - {type: prune_structured, criterion: deeplift, ratio: 0.5, finetune_epochs: 1}
      - {type: prune_unstructured, criterion: deeplift, ratio: 0.9, layers: fc}
      - {type: share, criterion: deeplift, clusters: 16, finetune_epochs: 1}
      - {type: quantize, criterion: deeplift, avg_bits: 4, qat_epochs: 1}
      - {type: finetune, epochs: 1}
    export: {packed: true, onnx: true}
    report: {fidelity_samples: 256, heatmaps: 4}

Every model forbids unknown keys, so a typo is an error, never silently ignored. Relative
paths (checkpoint, data folders) are relative to the working folder, as on the CLI.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from xaicompress.errors import XaiCompressError

Ratio = Annotated[float, Field(ge=0, lt=1)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
PosInt = Annotated[int, Field(ge=1)]


class _Strict(BaseModel):
    # extra="forbid": an unknown key is an error. allow_inf_nan=False: `ratio: .nan` is not
    # a ratio.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


def _check_criterion(spec: str, structured: bool = False) -> str:
    """Validate a criterion spec against the registry (raises ValueError for pydantic)."""
    from xaicompress.relevance import get_criterion

    spec = str(spec).strip()
    if structured and spec in ("tp:magnitude", "tp:taylor"):
        return spec
    try:
        get_criterion(spec)
    except XaiCompressError as exc:
        extra = ", tp:magnitude, tp:taylor" if structured else ""
        raise ValueError(f"criterion {spec!r}: {_why(exc)}{extra}") from None
    return spec


def _why(exc: Exception) -> str:
    # get_criterion's messages start with "--criterion 'x': "; keep only the reason.
    msg = str(exc)
    return msg.split(": ", 1)[1] if msg.startswith("--criterion") and ": " in msg else msg


class _Stage(_Strict):
    name: str | None = Field(None, description="Label in the report (default: the type).")

    def label(self) -> str:
        return self.name or self.type  # type: ignore[attr-defined]

    def options(self) -> dict[str, Any]:
        """The keyword options of the library step (everything but type/name/criterion)."""
        # None means "the library step's own default", so it is not passed at all.
        return self.model_dump(exclude={"type", "name", "criterion"}, exclude_none=True)


class CriterionStage(_Stage):
    criterion: str = "deeplift"
    samples: PosInt = 512

    @field_validator("criterion")
    @classmethod
    def _criterion(cls, v: str) -> str:
        return _check_criterion(v)


class PruneStructuredStage(CriterionStage):
    """Options of `xaicompress prune --structured` (see prune.structured.prune_structured)."""

    type: Literal["prune_structured"]
    ratio: Ratio = 0.5
    scope: Literal["layer", "global"] = "global"
    steps: PosInt = 1
    finetune_epochs: NonNegFloat = 1
    macs_ratio: Ratio | None = None
    min_channels: PosInt = 1
    norm: Literal["l1", "mean", "max"] = "l1"
    max_layer_ratio: Annotated[float, Field(gt=0, le=1)] | None = None
    finetune_lr: PosFloat | None = None

    @field_validator("criterion")
    @classmethod
    def _criterion(cls, v: str) -> str:
        return _check_criterion(v, structured=True)


class PruneUnstructuredStage(CriterionStage):
    """Options of `xaicompress prune --unstructured`."""

    type: Literal["prune_unstructured"]
    ratio: Ratio = 0.9
    layers: Literal["fc", "conv", "all"] = "fc"
    scope: Literal["layer", "global"] = "global"
    norm: Literal["none", "l1", "mean"] = "none"
    finetune_epochs: NonNegFloat = 1
    finetune_lr: PosFloat | None = None


class ShareStage(CriterionStage):
    """Options of `xaicompress share` (weight sharing; exactly one of clusters / avg_bits)."""

    type: Literal["share"]
    clusters: Annotated[int, Field(ge=2, le=256)] | dict[str, Annotated[int, Field(ge=2, le=256)]] \
        | None = None
    avg_bits: Annotated[float, Field(gt=0, le=8)] | None = None
    finetune_epochs: NonNegFloat = 1
    finetune_lr: PosFloat | None = None
    codebook_dtype: Literal["fp16", "fp32"] = "fp16"
    init: Literal["linear", "quantile", "kmeans++"] = "linear"
    weight_power: Annotated[float, Field(ge=0, le=4)] | None = None
    uniform_mix: Annotated[float, Field(ge=0, le=1)] = 0.0

    @model_validator(mode="after")
    def _one_budget(self) -> ShareStage:
        if (self.clusters is None) == (self.avg_bits is None):
            raise ValueError("give exactly one of clusters and avg_bits")
        return self


class QuantizeStage(CriterionStage):
    """Options of `xaicompress quantize` (exactly one of avg_bits / size_kb)."""

    type: Literal["quantize"]
    avg_bits: Annotated[float, Field(gt=0, le=8)] | None = None
    size_kb: PosFloat | None = None
    allocation: Literal["milp", "uniform"] = "milp"
    qat_epochs: NonNegFloat = 1
    qat_lr: PosFloat | None = None
    act_bits: Annotated[int, Field(ge=2, le=8)] | None = None
    clip: Literal["max", "mse"] = "mse"

    @model_validator(mode="after")
    def _one_budget(self) -> QuantizeStage:
        if (self.avg_bits is None) == (self.size_kb is None):
            raise ValueError("give exactly one of avg_bits and size_kb")
        return self


class FinetuneStage(_Stage):
    """Fine-tuning that keeps every constraint: centroid training for shared layers, QAT for
    integer layers, masked training otherwise."""

    type: Literal["finetune"]
    epochs: PosFloat = 1
    lr: PosFloat | None = None
    optimizer: Literal["adam", "sgd"] = "adam"
    #: None: each kind of fine-tuning's own default (centroid training uses 32, others 64)
    batch_size: PosInt | None = None


Stage = Annotated[
    PruneStructuredStage | PruneUnstructuredStage | ShareStage | QuantizeStage | FinetuneStage,
    Field(discriminator="type"),
]
STAGE_TYPES: dict[str, type[_Stage]] = {
    "prune_structured": PruneStructuredStage, "prune_unstructured": PruneUnstructuredStage,
    "share": ShareStage, "quantize": QuantizeStage, "finetune": FinetuneStage,
}


class ModelConfig(_Strict):
    name: str = Field(min_length=1)
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        from xaicompress.models import list_models

        if v not in list_models() and ":" not in v:
            raise ValueError(f"unknown model {v!r}; expected one of {', '.join(list_models())} "
                             "or package.module:factory")
        return v


class TrainConfig(_Strict):
    """Options of `xaicompress train` for the baseline."""

    epochs: PosFloat = 15
    lr: PosFloat | None = None
    optimizer: Literal["adam", "sgd"] = "adam"
    batch_size: PosInt = 64
    augment: Annotated[int, Field(ge=0, le=8)] = 2


class ExportConfig(_Strict):
    packed: bool = True
    onnx: bool = True


class ReportConfig(_Strict):
    fidelity_samples: Annotated[int, Field(ge=1, le=10000)] = 256
    heatmaps: Annotated[int, Field(ge=0, le=16)] = 4
    latency_repeats: Annotated[int, Field(ge=1, le=1000)] = 20


class PipelineConfig(_Strict):
    """A whole `compress` run: where the model comes from, the data, and the stages."""

    name: str | None = None
    model: ModelConfig | None = None
    checkpoint: str | None = None
    data: str = "mnist5k"
    seed: Annotated[int, Field(ge=0, lt=2**31)] = 0
    train: TrainConfig = Field(default_factory=TrainConfig)
    stages: list[Stage] = Field(default_factory=list)
    export: ExportConfig = Field(default_factory=ExportConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    @field_validator("model", mode="before")
    @classmethod
    def _model_str(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @field_validator("data")
    @classmethod
    def _data(cls, v: str) -> str:
        from xaicompress.data import parse_data_spec

        try:
            parse_data_spec(v)
        except XaiCompressError as exc:
            raise ValueError(str(exc).removeprefix("--data ")) from None
        return v

    @model_validator(mode="after")
    def _source(self) -> PipelineConfig:
        if (self.model is None) == (self.checkpoint is None):
            raise ValueError("give exactly one of model (to train a baseline) and checkpoint "
                             "(to start from a trained one)")
        if self.checkpoint is not None and "train" in self.model_fields_set:
            raise ValueError("train does not apply when starting from a checkpoint")
        return self

    def title(self) -> str:
        src = self.model.name if self.model else Path(self.checkpoint or "").name
        return self.name or f"{src} on {self.data}"

    def with_criterion(self, criterion: str) -> PipelineConfig:
        """A copy with `criterion` in every stage that has one (what `compare` runs)."""
        stages = [s.model_copy(update={"criterion": criterion}) if isinstance(
            s, CriterionStage) else s for s in self.stages]
        data = self.model_dump()
        data["stages"] = [s.model_dump() for s in stages]
        return validate_config(data, f"criterion {criterion!r}")

    def with_seed(self, seed: int) -> PipelineConfig:
        return self.model_copy(update={"seed": int(seed)})


# ------------------------------------------------------------------ loading
def validate_config(data: Any, source: str = "config") -> PipelineConfig:
    """Validate a parsed config (dict); any problem -> XaiCompressError naming the key."""
    if not isinstance(data, dict):
        raise XaiCompressError(f"{source}: expected a mapping of keys (model, data, stages, "
                               f"...), got {type(data).__name__}")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise XaiCompressError(f"{source}: {_format_error(exc)}") from None
    except XaiCompressError as exc:
        raise XaiCompressError(f"{source}: {exc}") from None
    except (TypeError, ValueError, RecursionError) as exc:  # odd inputs pydantic did not wrap
        raise XaiCompressError(f"{source}: invalid config ({type(exc).__name__}: {exc})") from None


def load_config(path: str | Path) -> PipelineConfig:
    """Read and validate a YAML config (`yaml.safe_load`: never constructs Python objects)."""
    p = Path(path)
    if not p.is_file():
        raise XaiCompressError(f"{p}: config file does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise XaiCompressError(f"{p}: cannot read config ({exc})") from None
    return parse_config_text(text, str(p))


def parse_config_text(text: str, source: str = "config") -> PipelineConfig:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise XaiCompressError(f"{source}: not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise XaiCompressError(f"{source}: YAML nested too deeply") from None
    return validate_config(data, source)


def _format_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    raw = tuple(err.get("loc", ()))
    loc = _clean_loc(raw)
    path = _loc_text(loc)
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        allowed = _allowed_keys(raw, loc[:-1])
        hint = f"; expected one of {', '.join(allowed)}" if allowed else ""
        return f"{path}: unknown key{hint}"
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    if kind == "missing":
        return f"{path}: required key is missing"
    if kind == "union_tag_invalid":
        tag = (err.get("ctx") or {}).get("tag")
        return f"{path}.type: {tag!r} is not a stage type; expected one of {', '.join(STAGE_TYPES)}"
    if kind == "union_tag_not_found":
        return f"{path}.type: required key is missing; expected one of {', '.join(STAGE_TYPES)}"
    given = err.get("input")
    shown = "" if isinstance(given, (dict, list)) or kind.startswith("union_tag") or \
        kind == "value_error" \
        else f" (got {given!r:.60})"
    n = exc.error_count()
    more = f" [and {n - 1} more problem{'s' if n > 2 else ''}]" if n > 1 else ""
    return f"{path}: {msg}{shown}{more}" if path else f"{msg}{more}"


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drop the discriminator tags and union member names pydantic puts into locations."""
    out: list[Any] = []
    for i, part in enumerate(loc):
        if isinstance(part, str) and i > 0 and isinstance(loc[i - 1], int) and \
                part in STAGE_TYPES and len(out) >= 2 and out[-2] == "stages":
            continue
        if isinstance(part, str) and (part in ("int", "float", "str", "bool", "none")
                                      or "[" in part or "-" in part):
            continue
        out.append(part)
    return tuple(out)


def _loc_text(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _allowed_keys(raw: tuple[Any, ...], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model at `loc` (for the 'unknown key' hint); `raw` is pydantic's
    location, which still names the stage type."""
    if len(raw) >= 3 and raw[0] == "stages" and raw[2] in STAGE_TYPES:
        return stage_keys(raw[2]) if len(loc) == 2 else []
    model: Any = PipelineConfig
    for part in loc:
        fields = model.model_fields if inspect.isclass(model) else {}
        if part not in fields:
            return []
        ann = fields[part].annotation
        model = next((a for a in getattr(ann, "__args__", (ann,))
                      if inspect.isclass(a) and issubclass(a, BaseModel)), None)
    return sorted(model.model_fields) if inspect.isclass(model) else []


def stage_keys(stage_type: str) -> list[str]:
    return sorted(STAGE_TYPES[stage_type].model_fields)
