"""User-facing errors: each message is one line naming the problem and the fix."""
from __future__ import annotations


class OffloadError(Exception):
    """Base of every error offload raises on bad input; the CLI prints it as one line and exits with code 2."""


class CheckpointError(OffloadError):
    """A checkpoint folder is missing, incomplete, corrupt or of an unsupported architecture."""


class ContextLengthError(OffloadError):
    """A prompt plus the requested new tokens do not fit max_context."""


class FormatError(OffloadError):
    """A weight format or shape a kernel cannot handle."""
