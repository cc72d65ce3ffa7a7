"""How good is a trained model? FID, CLIP score, prompt adherence and VAE reconstruction.

``evaluate.py`` is the entry point (``run_evaluation``); each metric lives in its own module and
works on uint8 images prepared one way (``ldm.evaluation.pixels``). ``results.py`` documents the
``results.json`` schema.
"""

from ldm.evaluation.errors import EvaluationError, MetricWeightsUnavailableError
from ldm.evaluation.run import EvaluationResult, run_evaluation

__all__ = [
    "EvaluationError",
    "EvaluationResult",
    "MetricWeightsUnavailableError",
    "run_evaluation",
]
