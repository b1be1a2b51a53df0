"""Relevance criteria behind one interface: `get_criterion(spec).score(model, loader)`."""

from xaicompress.relevance import (
    classic,  # noqa: F401  (register built-in criteria)
    deeplift,  # noqa: F401  (registers deeplift)
    gradient,  # noqa: F401  (registers taylor, gradxact, activation)
)
from xaicompress.relevance.base import (
    Criterion,
    Relevance,
    compute_relevance,
    get_criterion,
    list_criteria,
    prunable_layers,
    register_criterion,
)

__all__ = ["Criterion", "Relevance", "compute_relevance", "get_criterion", "list_criteria",
           "prunable_layers", "register_criterion"]
