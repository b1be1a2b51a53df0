"""The pipeline config: one YAML file, validated by pydantic, every mistake a one-line error.

Shape (see configs/*.yaml for commented examples)::

    model: lenet5                  # registered name or package.module:factory
    # model: {name: vgg11, kwargs: {width: 0.5}}
    # checkpoint: path/to/trained.safetensors   # instead of training: start from a checkpoint
    #                              (with model: naming its factory when it is your own code),
    #                              or from your own state dict (.pth / .pt / .bin /
    #                              .safetensors) with model: (and kwargs) saying what it is
    # preprocess: {normalise: imagenet, size: 32}   # the model's own (default: the data's)
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
    report: {fidelity: true, fidelity_samples: 256, heatmaps: 4}
    val: 0.1                       # training data held out for every choice (0 = none)
    # calibration: 1024            # post-training: stages that do not fine-tune read only
    #                              # this many training images
    # target: {max_drop: 0.5}      # accuracy budget: each stage's strength searched

Every option's default and range is declared once, in the models below; `xaicompress prune`,
`share`, `quantize`, `finetune` and `train` build their options from the same fields. Every
model forbids unknown keys, so a typo is an error, never silently ignored. Relative paths
(checkpoint, data folders) are relative to the working folder, as on the CLI.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from xaicompress.data.holdout import BUDGET_VAL_FRACTION, VAL_FRACTION
from xaicompress.device import AMP_CHOICES, DEVICE_CHOICES, Runtime, make_runtime
from xaicompress.errors import XaiCompressError
from xaicompress.export.calibration import CALIBRATION_METHODS
from xaicompress.pipeline.budget import MARGIN
from xaicompress.prune.structured import NORMS as STRUCTURED_NORMS
from xaicompress.prune.unstructured import LAYER_KINDS
from xaicompress.prune.unstructured import NORMS as UNSTRUCTURED_NORMS
from xaicompress.quant.codebook import (
    ALLOC_BITS,
    CODEBOOK_DTYPES,
    INITS,
    WEIGHT_POWER,
    WEIGHT_SCOPES,
)
from xaicompress.quant.entropy_share import ASSIGNMENTS
from xaicompress.quant.integer import ALLOCATIONS, BITS_CHOICES, CLIP_MODES
from xaicompress.quant.share_qat import FINETUNES
from xaicompress.validation import describe

# Every option is declared once, here: type, default, documented range and help. The CLI
# builds its options from these fields (`xaicompress.cli_app.model_options`), the pipeline
# validates configs with them, and the library steps' own defaults are the same values
# (tests/test_defaults.py checks all three). Choices come from the library's constants.
#: the largest number of epochs any training, fine-tuning or QAT accepts
MAX_EPOCHS = 1000
#: the largest learning rate accepted (Adam / SGD beyond 1 only diverges)
MAX_LR = 1.0
#: the largest batch size accepted
MAX_BATCH = 65536
#: the most training images a criterion may score (more than a dataset has = all of it)
MAX_SAMPLES = 1_000_000
MAX_SEED = 2**31 - 1

Epochs = Annotated[float, Field(ge=0, le=MAX_EPOCHS)]
LearningRate = Annotated[float, Field(gt=0, le=MAX_LR)]
Ratio = Annotated[float, Field(ge=0, lt=1)]
Clusters = Annotated[int, Field(ge=2, le=256)]


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

    @classmethod
    def stage_type(cls) -> str:
        return cls.model_fields["type"].annotation.__args__[0]  # type: ignore[union-attr]


def _distill_field() -> Any:
    return Field(0.0, ge=0, le=1, description=(
        "Weight of knowledge distillation from the step's input model in its fine-tuning "
        "loss: (1 - w) cross-entropy + w T^2 KL of the softened outputs (0 = off; 1 = no "
        "labels used)."))


class CriterionStage(_Stage):
    criterion: str = Field("deeplift", description=(
        "Relevance criterion name[:key=value,...]: deeplift, l1, taylor, gradxact, "
        "activation, random, none (uniform), e.g. deeplift:reference=mean."))
    samples: int = Field(512, ge=1, le=MAX_SAMPLES, description=(
        "Training images the criterion scores."))
    bn_recalibration: bool = Field(True, description=(
        "Re-estimate the BatchNorm statistics on calibration samples after the step "
        "(adaptive BatchNorm; off: keep the stored ones)."))
    distill: float = _distill_field()

    @field_validator("criterion")
    @classmethod
    def _criterion(cls, v: str) -> str:
        return _check_criterion(v)


def _max_layer_ratio_field(default: float | None, what: str) -> Any:
    """The per-layer cap of global-scope pruning (structured and unstructured)."""
    return Field(default, description=(
        f"Global scope: the most of any layer's {what} removed (none: halfway between the "
        "ratio and 1; 1 = no cap, one weight or channel always stays)."))


class PruneStructuredStage(CriterionStage):
    """Structured pruning (`xaicompress prune --structured`, `prune_structured`)."""

    type: Literal["prune_structured"]
    criterion: str = Field("deeplift", description=(
        "Criterion ranking the channels (as for every stage), or Torch-Pruning's own "
        "tp:magnitude / tp:taylor."))
    ratio: Ratio = Field(0.5, description="Fraction of the channels (filters / neurons) "
                         "removed.")
    scope: Literal["layer", "global"] = Field("global", description=(
        "layer: the ratio in every layer; global: one ranking over all layers."))
    steps: int = Field(1, ge=1, le=100, description=(
        "Iterative pruning steps (relevance recomputed and fine-tuning after each)."))
    finetune_epochs: Epochs = Field(0, description="Fine-tuning epochs after each step.")
    finetune_lr: LearningRate | None = Field(None, description=(
        "Adam learning rate of the fine-tuning (default 2e-3)."))
    macs_ratio: Ratio | None = Field(None, description=(
        "Prune until the MACs fall by this fraction (instead of ratio)."))
    min_channels: int = Field(1, ge=1, le=MAX_BATCH, description=(
        "Channels every layer keeps (below the widest layer's width)."))
    norm: Literal[STRUCTURED_NORMS] = Field("l1", description=(  # type: ignore[valid-type]
        "Global scope: how scores are compared across layers."))
    max_layer_ratio: Annotated[float, Field(gt=0, le=1)] | None = _max_layer_ratio_field(
        None, "channels")
    reconstruct: bool | None = Field(None, description=(
        "After each cut, refit the layers that lost input channels by least squares to the "
        "uncut layers' outputs on calibration samples (ThiNet-style). Default: on when the "
        "stage does not fine-tune (finetune_epochs 0), off when it does."))

    @field_validator("criterion")
    @classmethod
    def _criterion(cls, v: str) -> str:
        return _check_criterion(v, structured=True)

    @model_validator(mode="after")
    def _one_target(self) -> PruneStructuredStage:
        if self.macs_ratio is not None and "ratio" in self.model_fields_set:
            raise ValueError("give either ratio or macs_ratio, not both")
        return self


class PruneUnstructuredStage(CriterionStage):
    """Unstructured pruning (`xaicompress prune --unstructured`, `prune_unstructured`)."""

    type: Literal["prune_unstructured"]
    ratio: Ratio = Field(0.9, description="Fraction of the selected layers' weights zeroed.")
    layers: Literal[tuple(LAYER_KINDS)] = Field("fc", description=(  # type: ignore[valid-type]
        "Which layers: fc (Linear), conv (Conv2d) or all."))
    scope: Literal["layer", "global"] = Field("global", description=(
        "layer: the ratio in every layer; global: one ranking over all layers."))
    norm: Literal[UNSTRUCTURED_NORMS] = Field("none", description=(  # type: ignore[valid-type]
        "Global scope: none (raw scores), l1 or mean (per-layer normalised)."))
    max_layer_ratio: Annotated[float, Field(gt=0, le=1)] | None = _max_layer_ratio_field(
        None, "weights")
    finetune_epochs: Epochs = Field(0, description="Fine-tuning epochs (masks held).")
    finetune_lr: LearningRate | None = Field(None, description=(
        "Adam learning rate of the fine-tuning (default 2e-3)."))
    reconstruct: bool | None = Field(None, description=(
        "After the cut, refit each masked layer's kept weights by least squares to the "
        "unmasked layer's outputs on calibration samples (AdaPrune-style). Default: on "
        "when the stage does not fine-tune (finetune_epochs 0), off when it does."))


class ShareStage(CriterionStage):
    """Weight sharing (`xaicompress share`, `share_weights`); one of clusters / avg_bits."""

    type: Literal["share"]
    criterion: str = Field("deeplift", description=(
        "Criterion weighting the k-means (none = plain k-means)."))
    clusters: Clusters | dict[str, Clusters] | None = Field(None, description=(
        "k shared values in every layer (a config may give layer -> k)."))
    avg_bits: Annotated[float, Field(ge=0.01, le=max(ALLOC_BITS))] | None = Field(
        None, description="Budget in bits per weight: nearest: average index bits "
        f"({min(ALLOC_BITS)}..{max(ALLOC_BITS)}), clusters per layer from the bit-allocation "
        "solver; entropy: entropy-coded bits per weight, pruned weights, positions and "
        "codebooks included.")
    size_kb: Annotated[float, Field(gt=0, le=2**20)] | None = Field(None, description=(
        "assignment entropy, instead of avg_bits: budget as the packed file's size in KiB "
        "(header and biases included; the weights get what the rest leaves)."))
    assignment: Literal[ASSIGNMENTS] = Field(  # type: ignore[valid-type]
        "nearest", description="nearest (k-means) or entropy (relevance-weighted "
        "entropy-constrained assignment with a zero cluster, ECQx; needs avg_bits, clusters = "
        "codebook size).")
    finetune_epochs: Epochs = Field(0, description="Epochs of centroid fine-tuning (or of "
                                    "quantization-aware training, finetune qat).")
    finetune: Literal[FINETUNES] = Field(  # type: ignore[valid-type]
        "centroids", description="centroids (train the centroids, indices fixed) or qat "
        "(assignment entropy: train full-precision latent weights through the shared ones, "
        "re-run the assignment under the same budget twice an epoch, keep the best state on "
        "the validation split; ECQx).")
    finetune_lr: LearningRate | None = Field(None, description=(
        "One learning rate for the centroid fine-tuning (default: scaled per layer)."))
    codebook_dtype: Literal[tuple(CODEBOOK_DTYPES)] = Field(  # type: ignore[valid-type]
        "fp16", description="Codebook dtype in the packed file.")
    init: Literal[INITS] = Field("linear", description="k-means start.")  # type: ignore[valid-type]
    weight_power: Annotated[float, Field(gt=0, le=4)] = Field(WEIGHT_POWER, description=(
        "Exponent on the relevance sample weights of the k-means."))
    uniform_mix: Annotated[float, Field(ge=0, le=1)] = Field(0.0, description=(
        "Share of uniform weight mixed into the relevance sample weights."))
    weight_scope: Literal[WEIGHT_SCOPES] = Field(  # type: ignore[valid-type]
        "layer", description="Scale of the sample weights across layers: layer (mean 1 in "
        "every layer) or global (mean 1 over all shared layers, so layers whose weights "
        "score higher get more bits).")
    bias_correction: bool = Field(True, description=(
        "Shift each layer's bias so its per-channel output mean on calibration samples is "
        "the float model's (empirical bias correction)."))

    @model_validator(mode="after")
    def _one_budget(self) -> ShareStage:
        if self.finetune == "qat" and self.assignment != "entropy":
            raise ValueError("finetune qat re-runs the entropy-constrained assignment: it "
                             "needs assignment entropy")
        if self.assignment == "entropy":
            if (self.avg_bits is None) == (self.size_kb is None) or isinstance(self.clusters,
                                                                                dict):
                raise ValueError("assignment entropy needs exactly one of avg_bits and "
                                 "size_kb (and at most one clusters number, the codebook size)")
            return self
        if self.size_kb is not None:
            raise ValueError("size_kb is a budget of assignment entropy")
        if (self.clusters is None) == (self.avg_bits is None):
            raise ValueError("give exactly one of clusters and avg_bits")
        if self.avg_bits is not None and self.avg_bits < min(ALLOC_BITS):
            raise ValueError(f"avg_bits {self.avg_bits}: nearest assignment needs at least "
                             f"{min(ALLOC_BITS)} bit (below that, use assignment entropy)")
        return self


class QuantizeStage(CriterionStage):
    """Mixed-precision integers (`xaicompress quantize`, `quantize`); one of avg_bits /
    size_kb."""

    type: Literal["quantize"]
    criterion: str = Field("deeplift", description=(
        "Relevance weighting the quantization error (none = unweighted)."))
    avg_bits: Annotated[float, Field(ge=min(BITS_CHOICES), le=max(BITS_CHOICES))] | None = \
        Field(None, description="Budget: mean bits per stored weight.")
    size_kb: Annotated[float, Field(gt=0, le=2**20)] | None = Field(None, description=(
        "Budget: packed model size in KiB."))
    allocation: Literal[ALLOCATIONS] = Field("milp", description=(  # type: ignore[valid-type]
        "milp (relevance-weighted error, exact) or uniform (same bits everywhere)."))
    qat_epochs: Epochs = Field(0, description="Epochs of quantization-aware training.")
    qat_lr: LearningRate = Field(1e-3, description="Adam learning rate of the QAT.")
    act_bits: Annotated[int, Field(ge=2, le=8)] | None = Field(None, description=(
        "Quantize activations to this many bits, calibrated."))
    clip: Literal[CLIP_MODES] = Field("mse", description=(  # type: ignore[valid-type]
        "Per-channel scale: mse (MSE clipping search), wmse (relevance-weighted) or max."))
    bias_correction: bool = Field(True, description=(
        "Shift each layer's bias so its per-channel output mean on calibration samples is "
        "the float model's (empirical bias correction)."))

    @model_validator(mode="after")
    def _one_budget(self) -> QuantizeStage:
        if (self.avg_bits is None) == (self.size_kb is None):
            raise ValueError("give exactly one of avg_bits and size_kb")
        return self


class FinetuneStage(_Stage):
    """Fine-tuning that keeps every constraint: centroid training for shared layers, QAT for
    integer layers, masked training otherwise (`xaicompress finetune`)."""

    type: Literal["finetune"]
    epochs: Annotated[float, Field(gt=0, le=MAX_EPOCHS)] = Field(1, description="Epochs.")
    lr: LearningRate | None = Field(None, description=(
        "Learning rate (default: that kind's own: 5e-4 masked, 1e-3 QAT, scaled per layer "
        "for centroids)."))
    optimizer: Literal["adam", "sgd"] = Field("adam", description=(
        "Optimizer of masked fine-tuning."))
    batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH)] | None = Field(None, description=(
        "Batch size (default: that kind's own: 32 for centroids, 64 otherwise)."))
    distill: float = _distill_field()


STAGE_MODELS: tuple[type[_Stage], ...] = (PruneStructuredStage, PruneUnstructuredStage,
                                          ShareStage, QuantizeStage, FinetuneStage)
Stage = Annotated[
    PruneStructuredStage | PruneUnstructuredStage | ShareStage | QuantizeStage | FinetuneStage,
    Field(discriminator="type"),
]


def stage_types() -> list[str]:
    return [m.stage_type() for m in STAGE_MODELS]


def stage_model(stage_type: str) -> type[_Stage]:
    return next(m for m in STAGE_MODELS if m.stage_type() == stage_type)


class ModelConfig(_Strict):
    name: str = Field(min_length=1, description="Registered name or package.module:factory.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description=(
        "Keyword arguments of the factory."))

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        from xaicompress.models import list_models

        if v not in list_models() and ":" not in v:
            raise ValueError(f"unknown model {v!r}; expected one of {', '.join(list_models())} "
                             "or package.module:factory")
        return v


class TrainConfig(_Strict):
    """Options of `xaicompress train` (`train_checkpoint`), also the baseline's training."""

    epochs: Epochs = Field(15, description="Training epochs (0 = the model as built).")
    lr: LearningRate | None = Field(None, description=(
        "Learning rate (default 3e-3 Adam, 0.05 SGD)."))
    optimizer: Literal["adam", "sgd"] = Field("adam", description="adam or sgd.")
    batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH)] = Field(64, description=(
        "Global batch size (split over torchrun ranks)."))
    augment: Annotated[int, Field(ge=0, le=32)] | None = Field(None, description=(
        "Random shifts of up to N pixels while training (0 = off; default: image height "
        "// 12, i.e. 2 on 28 x 28)."))


class PreprocessConfig(_Strict):
    """The model's preprocessing (`data/preprocess.py`): options of `xaicompress import`
    and a config's `preprocess:`; recorded in the checkpoint and used by every step."""

    normalise: str | None = Field(None, description=(
        "Per-channel MEAN/STD of [0, 1] pixels, comma-separated channels "
        "(0.485,0.456,0.406/0.229,0.224,0.225), imagenet, none (0/1) or data (default: the "
        "training split's own statistics)."))
    size: Annotated[int, Field(ge=1, le=4096)] | None = Field(None, description=(
        "Model input size N (N x N images; default: the data's, 32 for folders)."))
    resize: Annotated[int, Field(ge=1, le=4096)] | None = Field(None, description=(
        "Image folders: resize the shorter side to this, then centre-crop size x size "
        "(torchvision's Resize + CenterCrop)."))

    @field_validator("normalise")
    @classmethod
    def _normalise(cls, v: str | None) -> str | None:
        from xaicompress.data.preprocess import parse_normalise

        if v is not None:
            try:
                parse_normalise(v, "normalise")
            except XaiCompressError as exc:
                raise ValueError(str(exc).removeprefix("normalise ")) from None
        return v

    @model_validator(mode="after")
    def _crop(self) -> PreprocessConfig:
        if self.resize is not None and (self.size is None or self.size > self.resize):
            raise ValueError("resize needs size (the centre crop), no larger than resize")
        return self

    def preprocess(self) -> Any:
        """The `data.preprocess.Preprocess` these options give (unset = the data's)."""
        from xaicompress.data.preprocess import Preprocess, parse_normalise

        stats = parse_normalise(self.normalise) if self.normalise is not None else None
        return Preprocess(*(stats or (None, None)), size=self.size, resize=self.resize)




class CalibrationOptions(_Strict):
    """How the integer ONNX's activations are calibrated (export/calibration.py)."""

    calibration: Annotated[int, Field(ge=1, le=100_000)] = Field(256, description=(
        "Training images that calibrate the integer ONNX's activation ranges."))
    calibration_method: Literal[CALIBRATION_METHODS] = Field(  # type: ignore[valid-type]
        "minmax", description="Activation range rule: minmax, percentile or mse.")
    percentile: Annotated[float, Field(gt=0, le=100)] = Field(99.99, description=(
        "Percentile of the percentile rule (clips 100 - p % of each tail)."))


class ExportConfig(CalibrationOptions):
    packed: bool = True
    onnx: bool = True
    onnx_int8: bool = Field(True, description=(
        "Also write model.int8.onnx (integer kernels in onnxruntime) when the final model "
        "has integer-quantized layers."))


class ReportConfig(_Strict):
    fidelity: bool = Field(True, description=(
        "Compare the DeepLIFT maps of every stage with the original's (off: accuracy "
        "agreement only)."))
    fidelity_samples: Annotated[int, Field(ge=1, le=10000)] = 256
    heatmaps: Annotated[int, Field(ge=0, le=16)] = 4
    latency_repeats: Annotated[int, Field(ge=1, le=1000)] = 20


#: `device:` values: auto (the GPU when there is one), cpu, cuda, cuda:N (xaicompress.device)
DEVICE_PATTERN = r"^\s*(auto|cpu|cuda|cuda:\d+)\s*$"


class RuntimeConfig(_Strict):
    """Where and how models run (`--device`, `--workers`, `--amp`, `--deterministic` of
    every command that runs a model; top-level keys of a config). Not part of the stage
    cache key except `amp`, which changes the numbers (docs/design.md "Devices")."""

    device: str = Field("auto", description=(
        "auto (the GPU when there is one; cuda:LOCAL_RANK under torchrun), cpu, cuda or "
        "cuda:N."))
    workers: Annotated[int, Field(ge=0, le=64)] | None = Field(None, description=(
        "DataLoader worker processes (default: 0 on the CPU, 2 on a GPU)."))
    amp: Literal[AMP_CHOICES] = Field("off", description=(  # type: ignore[valid-type]
        "Mixed precision of training and fine-tuning (bf16, fp16 with loss scaling: CUDA "
        "only); relevance always runs in float32."))
    deterministic: bool = Field(False, description=(
        "torch.use_deterministic_algorithms: the same seed gives the same numbers on a "
        "GPU too (slower; ops without a deterministic kernel raise)."))

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.match(DEVICE_PATTERN, v, re.IGNORECASE):
            raise ValueError(f"expected one of {', '.join(DEVICE_CHOICES)}")
        return v.strip().lower()

    def runtime(self) -> Runtime:
        """The resolved settings (an unavailable device is an XaiCompressError)."""
        return make_runtime(self.device, self.workers, self.amp, self.deterministic)


#: the most training images the post-training mode reads (`calibration`)
MAX_CALIBRATION = 1024
MaxDrop = Annotated[float, Field(gt=0, le=100)]
Margin = Annotated[float, Field(ge=0, le=10)]
Calibration = Annotated[int, Field(ge=1, le=MAX_CALIBRATION)]
ValFraction = Annotated[float, Field(ge=0, le=0.5)]
#: help of the run-level options, shared by the config fields and `compress`'s flags
RUN_HELP = {
    "max_drop": "Accuracy budget in points: each stage's strength (ratio, clusters, average "
                "bits) is searched for the smallest packed file whose validation accuracy "
                "stays within it.",
    "calibration": "Post-training: every stage that does not fine-tune reads only this many "
                   "training images (scores, BatchNorm statistics, bias correction).",
    "val": "Share of the training data held out as the validation split every choice is "
           f"made on (0 = none; the budget needs one). Default {VAL_FRACTION}, "
           f"{BUDGET_VAL_FRACTION} with a budget.",
    "margin": "Standard errors of the paired validation drop (baseline and probe on the same "
              "images) added to the drop before it is compared with the budget: a probe whose "
              "drop looks within budget by luck is refused (0 = the drop as measured).",
}


class TargetConfig(_Strict):
    """An accuracy budget (`target: {max_drop: 0.5}`, `compress --max-drop 0.5`)."""

    max_drop: MaxDrop = Field(description=RUN_HELP["max_drop"])
    probes: Annotated[int, Field(ge=2, le=20)] = Field(6, description=(
        "Stage runs each searched stage may take (the first at the config's value)."))
    margin: Margin = Field(MARGIN, description=RUN_HELP["margin"])


class RunOptions(_Strict):
    """The run-level options `compress` takes on its command line (each overrides the
    config's): the same types, ranges and help as the config's fields."""

    max_drop: MaxDrop | None = Field(None, description=RUN_HELP["max_drop"])
    calibration: Calibration | None = Field(None, description=RUN_HELP["calibration"])
    val: ValFraction | None = Field(None, description=RUN_HELP["val"])
    margin: Margin | None = Field(None, description=RUN_HELP["margin"])


class PipelineConfig(RuntimeConfig):
    """A whole `compress` run: where the model comes from, the data, and the stages (and,
    from RuntimeConfig, the device it runs on)."""

    name: str | None = None
    model: ModelConfig | None = None
    checkpoint: str | None = None
    data: str = "mnist5k"
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = 0
    train: TrainConfig = Field(default_factory=TrainConfig)
    #: the model's preprocessing when it is trained here or imported from a state dict
    #: (`checkpoint: weights.pth`); an xaicompress checkpoint carries its own
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    stages: list[Stage] = Field(default_factory=list)
    export: ExportConfig = Field(default_factory=ExportConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    val: ValFraction = Field(VAL_FRACTION, description=RUN_HELP["val"])
    calibration: Calibration | None = Field(None, description=RUN_HELP["calibration"])
    target: TargetConfig | None = None

    @field_validator("model", mode="before")
    @classmethod
    def _model_str(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="before")
    @classmethod
    def _budget_val(cls, data: Any) -> Any:
        """A budget chooses on the validation split: without `val`, it gets a larger one
        (`BUDGET_VAL_FRACTION`) than the default."""
        if isinstance(data, dict) and data.get("target") is not None and "val" not in data:
            return {**data, "val": BUDGET_VAL_FRACTION}
        return data

    @field_validator("data")
    @classmethod
    def _data(cls, v: str, info: ValidationInfo) -> str:
        from xaicompress.data import parse_data_spec

        if _in_memory(info):
            return v
        try:
            parse_data_spec(v)
        except XaiCompressError as exc:
            raise ValueError(str(exc).removeprefix("--data ")) from None
        return v

    @model_validator(mode="after")
    def _source(self, info: ValidationInfo) -> PipelineConfig:
        if _in_memory(info):
            given = sorted(set(self.model_fields_set) & IN_MEMORY_REFUSED)
            if given:
                raise ValueError(f"{given[0]} does not apply to xc.compress (the model and "
                                 "the data are the Python objects given)")
            return self
        if self.model is None and self.checkpoint is None:
            raise ValueError("give model (to train a baseline) or checkpoint (to start from a "
                             "trained one; with model: naming its factory if it is your own)")
        if self.checkpoint is not None and "train" in self.model_fields_set:
            raise ValueError("train does not apply when starting from a checkpoint")
        # model.kwargs and preprocess apply to a state dict (checkpoint: weights.pth) and
        # are refused for an xaicompress checkpoint when it is read (it stores both)
        if self.target is not None and self.val == 0:
            raise ValueError("target needs a validation split to choose on; give val > 0")
        return self

    @property
    def trusted_model(self) -> str | None:
        """The model factory the user names (trusted for loading checkpoints and cache)."""
        return self.model.name if self.model is not None else None

    def title(self) -> str:
        src = Path(self.checkpoint).name if self.checkpoint else (
            self.model.name if self.model else "")
        return self.name or f"{src} on {self.data}"

    def with_criterion(self, criterion: str) -> PipelineConfig:
        """A copy with `criterion` in every stage that has one (what `compare` runs)."""
        data = self.model_dump(exclude_unset=True)
        data["stages"] = [{**s.model_dump(exclude_unset=True), "type": s.type}
                          | ({"criterion": criterion} if isinstance(s, CriterionStage) else {})
                          for s in self.stages]
        return validate_config(data, f"criterion {criterion!r}")

    def with_seed(self, seed: int) -> PipelineConfig:
        return self.model_copy(update={"seed": int(seed)})

    def with_run_options(self, options: RunOptions) -> PipelineConfig:
        """A copy with the run-level options given on the command line."""
        data = self.model_dump(exclude_unset=True)
        if options.max_drop is not None:
            data["target"] = {**data.get("target", {}), "max_drop": options.max_drop}
        if options.margin is not None:
            if "target" not in data:
                raise XaiCompressError("--margin: applies to an accuracy budget; give "
                                       "--max-drop (or target: in the config)")
            data["target"] = {**data["target"], "margin": options.margin}
        for key in ("calibration", "val"):
            if getattr(options, key) is not None:
                data[key] = getattr(options, key)
        return validate_config(data, "options")


#: keys a config for the Python API's in-memory model and data (`xc.compress`) cannot have
IN_MEMORY_REFUSED = frozenset({"model", "checkpoint", "data", "train", "preprocess"})


def _in_memory(info: ValidationInfo) -> bool:
    return bool(isinstance(info.context, dict) and info.context.get("in_memory"))


# ------------------------------------------------------------------ loading
def validate_config(data: Any, source: str = "config", *,
                    in_memory: bool = False) -> PipelineConfig:
    """Validate a parsed config (dict); any problem -> XaiCompressError naming the key.

    in_memory: for `xc.compress` (model and data are Python objects): no model, checkpoint,
    data, train or preprocess keys; `data` is the name the report gives the data."""
    if not isinstance(data, dict):
        raise XaiCompressError(f"{source}: expected a mapping of keys (model, data, stages, "
                               f"...), got {type(data).__name__}")
    try:
        return PipelineConfig.model_validate(data, context={"in_memory": in_memory})
    except ValidationError as exc:
        raise XaiCompressError(f"{source}: {_format_error(exc)}") from None
    except XaiCompressError as exc:
        raise XaiCompressError(f"{source}: {exc}") from None
    except (TypeError, ValueError, RecursionError) as exc:  # odd inputs pydantic did not wrap
        raise XaiCompressError(f"{source}: invalid config ({type(exc).__name__}: {exc})") from None


#: A config is a few dozen lines; these caps stop a hostile one before it costs anything:
#: the file's size, and the number of values once YAML aliases are expanded (a "billion
#: laughs" file of 1 KB names 10^9 values through nested aliases).
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 100_000


def load_config(path: str | Path) -> PipelineConfig:
    """Read and validate a YAML config (`yaml.safe_load`: never constructs Python objects)."""
    p = Path(path)
    if not p.is_file():
        raise XaiCompressError(f"{p}: config file does not exist")
    try:
        size = p.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise XaiCompressError(f"{p}: config file is {size} bytes, more than the "
                                   f"{MAX_CONFIG_BYTES} a config may have")
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise XaiCompressError(f"{p}: cannot read config ({exc})") from None
    return parse_config_text(text, str(p))


class _CountingLoader(yaml.SafeLoader):
    """SafeLoader that counts every node it composes, an alias counting as the whole
    subtree it repeats, and stops past MAX_CONFIG_VALUES before anything is expanded."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._sizes: dict[int, int] = {}
        self._total = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            anchor = self.anchors.get(event.anchor)
            self._add(self._sizes.get(id(anchor), 1) if anchor is not None else 1)
            return super().compose_node(parent, index)
        before = self._total
        node = super().compose_node(parent, index)
        self._add(1)
        self._sizes[id(node)] = self._total - before
        return node

    def _add(self, n: int) -> None:
        self._total += n
        if self._total > MAX_CONFIG_VALUES:
            raise _TooBig


class _TooBig(Exception):
    pass


def parse_config_text(text: str, source: str = "config") -> PipelineConfig:
    if len(text) > MAX_CONFIG_BYTES:
        raise XaiCompressError(f"{source}: config is {len(text)} characters, more than the "
                               f"{MAX_CONFIG_BYTES} a config may have")
    try:
        data = yaml.load(text, Loader=_CountingLoader)  # noqa: S506 - a SafeLoader
    except _TooBig:
        raise XaiCompressError(f"{source}: config expands to more than {MAX_CONFIG_VALUES} "
                               "values (YAML aliases repeating aliases?)") from None
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
    kind = err.get("type", "")
    raw = tuple(err.get("loc", ()))
    path = _loc_text(_clean(raw))
    types = ", ".join(stage_types())
    if kind == "union_tag_invalid":
        tag = (err.get("ctx") or {}).get("tag")
        return f"{path}.type: {tag!r} is not a stage type; expected one of {types}"
    if kind == "union_tag_not_found":
        return f"{path}.type: required key is missing; expected one of {types}"
    return describe(exc, _loc_text, allowed=lambda loc: _allowed_keys(raw, loc[:-1]),
                    tags=stage_types())


def _clean(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    from xaicompress.validation import clean_loc

    return clean_loc(loc, stage_types())


def _loc_text(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _allowed_keys(raw: tuple[Any, ...], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model at `loc` (for the 'unknown key' hint); `raw` is pydantic's
    location, which still names the stage type."""
    if len(raw) >= 3 and raw[0] == "stages" and raw[2] in stage_types():
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
    return sorted(stage_model(stage_type).model_fields)

