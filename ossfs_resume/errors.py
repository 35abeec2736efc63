"""Exceptions with one-line messages meant for users.

Every error the CLI can show is an :class:`OssfsError`; its ``str()`` is the
whole message, already free of secrets, so the CLI prints it as is.
"""

from __future__ import annotations

import errno


class OssfsError(Exception):
    """Base class; ``str(exc)`` is a complete one-line message."""

    #: errno a FUSE callback answers with when this error ends a read.
    errno: int = errno.EIO


class UsageError(OssfsError):
    """Bad command-line input: caught before any request or mount."""

    errno = errno.EINVAL


class StoreError(OssfsError):
    """The object store answered with an error, or could not be reached."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        key: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.key = key
        self.request_id = request_id


class NotFoundError(StoreError):
    """NoSuchKey (404) for an object."""

    errno = errno.ENOENT


class NoSuchBucketError(StoreError):
    """The bucket does not exist."""

    errno = errno.ENOENT


class AccessDeniedError(StoreError):
    """403: wrong credentials, a bad signature, or no permission."""

    errno = errno.EACCES


class PreconditionFailedError(StoreError):
    """412: the object no longer has the ETag the request was pinned to."""


class InvalidRangeError(StoreError):
    """416: the range starts at or past the end of the object."""


class StoreUnavailableError(StoreError):
    """Connection failures, timeouts, 429 and 5xx that outlasted the retries."""


class TLSError(StoreError):
    """The TLS handshake failed for a reason retrying cannot fix (e.g. an untrusted certificate)."""


class ProtocolError(StoreError):
    """The store answered something a correct store never does (e.g. 200 to a ranged GET)."""


class ChecksumError(OssfsError):
    """Data did not match its recorded checksum."""


class CheckpointError(OssfsError):
    """A resumable-download checkpoint could not be used."""


class CacheWriteError(OssfsError):
    """The cache directory refused a part (full disk, floor reached, read-only)."""

    errno = errno.ENOSPC
