"""Relevance criteria behind one interface: `get_criterion(spec).score(model, loader)`."""

from xaicompress.relevance import classic  # noqa: F401  (register built-in criteria)
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
