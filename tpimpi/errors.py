"""Errors a user can act on. Each one is printed once, by rank 0, and ends the run with exit code 2."""


class TpimpiError(Exception):
    """A problem with the user's input, model files or store; the message says what and what to do."""


class UsageError(TpimpiError):
    """A command-line value is out of range or inconsistent."""


class StoreError(TpimpiError):
    """A weight store is missing, damaged, or does not match the launch."""


class ModelError(TpimpiError):
    """A model source (GGUF file, Hugging Face directory) cannot be read or is not supported."""
