"""User-facing errors: each message is one line naming the problem and the fix."""
from __future__ import annotations

import errno


class OffloadError(Exception):
    """Base of every error offload raises on bad input; the CLI prints it as one line and exits with code 2."""


class CheckpointError(OffloadError):
    """A checkpoint folder is missing, incomplete, corrupt or of an unsupported architecture."""


class ContextLengthError(OffloadError):
    """A prompt plus the requested new tokens do not fit max_context."""


class FormatError(OffloadError):
    """A weight format or shape a kernel cannot handle."""


# What to do about the I/O errors a user can fix, by errno; the others get the system's own description.
_IO_FIXES = {
    errno.ENOSPC: "the disk is full; free space or choose a folder on another disk",
    errno.EDQUOT: "the disk quota is used up; free space or choose a folder on another disk",
    errno.EROFS: "the file system is read-only; choose a folder on a writable disk",
    errno.EACCES: "permission denied; choose a folder you can write to or fix its permissions",
    errno.EPERM: "operation not permitted; choose a folder you own or fix its permissions",
    errno.ENOENT: "no such file or folder; check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
    errno.EISDIR: "it is a folder, not a file; pass a file",
}


def io_error_line(error: OSError) -> str:
    """One line for an I/O error: the path, what went wrong and the fix (or the system's description)."""
    where = f"{error.filename}: " if error.filename is not None else ""
    fix = _IO_FIXES.get(error.errno) or f"{error.strerror or error}; check the path and the disk"
    return f"{where}{fix}"
