"""Exceptions a handler raises to shape its error result."""

from __future__ import annotations

from typing import Any, Dict, Optional


class StepError(Exception):
    """Base class for handler errors with explicit protocol fields.

    ``code`` becomes the result's ``error.type`` (default: the class name),
    ``retryable`` its ``error.retryable``, ``retry_after_ms`` overrides the
    broker's backoff and ``details`` (a dict) is stored with the attempt.
    Any other exception also works: its class name is the type, and it is
    retryable.
    """

    retryable: bool = True

    def __init__(
        self,
        message: str = "",
        *,
        code: Optional[str] = None,
        retryable: Optional[bool] = None,
        retry_after_ms: Optional[int] = None,
        details: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable
        self.retry_after_ms = retry_after_ms
        self.details = details


class RetryableError(StepError):
    """A failure worth retrying (the default for any exception)."""

    retryable = True


class PermanentError(StepError):
    """Fail the step now, whatever attempts are left (``retryable: false``)."""

    retryable = False


class RetryAfter(RetryableError):
    """Retry, but not before the given delay.

    ``RetryAfter(30)`` waits 30 seconds; ``RetryAfter(ms=1500)`` 1.5 seconds.
    A float or int positional argument is seconds.
    """

    def __init__(
        self,
        seconds: Optional[float] = None,
        message: str = "",
        *,
        ms: Optional[int] = None,
        code: Optional[str] = None,
        details: Optional[Dict[str, Any]] = None,
    ) -> None:
        if ms is None:
            ms = int(round((seconds or 0) * 1000))
        super().__init__(message or f"retry after {ms} ms", code=code, retry_after_ms=ms, details=details)


class Cancelled(RetryableError):
    """Raise from a handler that stopped because ``step.cancelled`` was set."""
