"""Errors raised at the model-loading boundary; each message says what was wrong and what to do."""


class ModelLoadError(ValueError):
    """A model file or directory could not be used (missing, corrupt, unsupported)."""


class ContextWindowError(ValueError):
    """A prompt (plus the tokens asked for) does not fit the model's context window."""
