"""The errors ``evaluate.py`` turns into one plain message instead of a traceback."""


class EvaluationError(Exception):
    """Bad input to an evaluation (a metric name, a path, a setting): the message says the fix.

    Failures of the layers below that a user can fix are re-raised as this type where the
    evaluation calls them, so genuine bugs keep their tracebacks.
    """


class MetricWeightsUnavailableError(EvaluationError):
    """A metric's pretrained network (Inception, CLIP) could not be found locally nor downloaded."""


def one_line(error: BaseException, limit: int = 300) -> str:
    """A library's error on one short line: enough to diagnose, not a wall of text."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
