"""Looking into checkpoints without merging them: how similar models are (similarity) and what keys they hold
(elements). Neither needs a loaded model, so the CLI, the standalone app and the tab can all use them."""

from .elements import Element, list_elements
from .similarity import Comparison, compare_models, format_comparison

__all__ = ["Comparison", "Element", "compare_models", "format_comparison", "list_elements"]
