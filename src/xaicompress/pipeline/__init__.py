"""The one pipeline: config -> baseline -> stages (cached) -> packed file, ONNX, report.

`load_config(path)` reads and validates a YAML config; `run_pipeline(config, out)` runs it
(what `xaicompress compress` does); `run_compare(config, criteria, seeds, out)` runs it per
criterion and seed (`xaicompress compare`).
"""

from xaicompress.pipeline.compare import run_compare
from xaicompress.pipeline.config import (
    PipelineConfig,
    load_config,
    parse_config_text,
    validate_config,
)
from xaicompress.pipeline.run import PipelineResult, run_pipeline, stage_seed
from xaicompress.pipeline.stages import STAGES, register_stage, run_stage

__all__ = ["STAGES", "PipelineConfig", "PipelineResult", "load_config", "parse_config_text",
           "register_stage", "run_compare", "run_pipeline", "run_stage", "stage_seed",
           "validate_config"]
