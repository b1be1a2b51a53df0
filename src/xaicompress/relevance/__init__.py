"""Relevance criteria behind one interface: `get_criterion(spec).score(model, loader, need)`.

Layout: `base` (Relevance, the Criterion contract, AccumulatingCriterion, compute_relevance),
`registry` (criteria by name, spec parsing), `options` (checked option values), `rules`
(the DeepLIFT rule table), `canonical` (tracing and rewriting a model), `engine` (one-pass
DeepLIFT), `kernels` (per-unit / per-weight contributions), `references`, and one module
per family of criteria: `deeplift`, `gradient` (taylor, gradxact, activation), `curvature`
(hessian, fisher), `classic` (l1, random, none).
"""

from xaicompress.relevance import (
    classic,  # noqa: F401  (register built-in criteria)
    curvature,  # noqa: F401  (registers hessian, fisher)
    deeplift,  # noqa: F401  (registers deeplift)
    gradient,  # noqa: F401  (registers taylor, gradxact, activation)
)
from xaicompress.relevance.base import (
    UNITS,
    WEIGHTS,
    AccumulatingCriterion,
    Criterion,
    Relevance,
    Sums,
    compute_relevance,
    prunable_layers,
)
from xaicompress.relevance.engine import DeepLiftEngine, LayerPass, layer_attributions
from xaicompress.relevance.registry import (
    CriterionError,
    get_criterion,
    list_criteria,
    register_criterion,
)
from xaicompress.relevance.rules import (
    MaxPool,
    PassThrough,
    Product,
    Rescale,
    Rule,
    register_rule,
    rules_table,
)

__all__ = ["UNITS", "WEIGHTS", "AccumulatingCriterion", "Criterion", "CriterionError",
           "DeepLiftEngine", "LayerPass", "MaxPool", "PassThrough", "Product", "Relevance",
           "Rescale", "Rule", "Sums", "compute_relevance", "get_criterion",
           "layer_attributions", "list_criteria", "prunable_layers", "register_criterion",
           "register_rule", "rules_table"]
