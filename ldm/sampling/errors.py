"""The one error type ``sample.py`` turns into a plain message instead of a traceback."""


class SamplingError(Exception):
    """Bad input to sampling (a path, a checkpoint, an option): the message says what to do.

    Errors from the layers below (checkpoint loading, option checks) are re-raised as this type
    at the point where sampling calls them, so the entry script catches exactly the failures a
    user can fix and lets genuine bugs keep their tracebacks.
    """
