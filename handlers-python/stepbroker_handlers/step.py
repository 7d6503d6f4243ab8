"""The object a handler receives for one attempt."""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any, Callable, Dict, Mapping, Optional

ProgressSink = Callable[[str, Optional[float], Optional[str]], None]


_TRACEPARENT = re.compile(r"^00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$")


class Trace:
    """The attempt's W3C trace context (``STEP.steps[i].trace``, PROTOCOL.md "Trace context").

    ``traceparent`` names the attempt's own span: start the handler's spans as
    its children (e.g. pass it as a ``traceparent`` header, or to an
    OpenTelemetry propagator). ``trace_id`` is the task's trace, ``span_id``
    the attempt's span.
    """

    __slots__ = ("traceparent", "tracestate", "trace_id", "span_id", "sampled")

    def __init__(self, traceparent: str, tracestate: Optional[str]) -> None:
        self.traceparent = traceparent
        self.tracestate = tracestate
        self.trace_id = traceparent[3:35]
        self.span_id = traceparent[36:52]
        self.sampled = (int(traceparent[53:55], 16) & 1) == 1

    @staticmethod
    def of(value: Any) -> Optional["Trace"]:
        """The trace context of a STEP item's ``trace``; None when absent or malformed (an older broker)."""
        if not isinstance(value, dict):
            return None
        tp = value.get("traceparent")
        if not isinstance(tp, str) or not _TRACEPARENT.match(tp):
            return None
        ts = value.get("tracestate")
        return Trace(tp, ts if isinstance(ts, str) else None)

    def __repr__(self) -> str:
        return f"Trace({self.traceparent!r})"


def _int(v: Any, default: int) -> int:
    # Integral floats are integers on the wire (PROTOCOL.md, Test vectors).
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return default
    return int(v)


class Step:
    """One dispatched attempt of a step (``STEP.steps[i]`` in PROTOCOL.md).

    Attributes mirror the wire fields. ``cancelled`` is a
    :class:`threading.Event` set when the broker sends CANCEL for this attempt
    or the pool shuts down; ``cancel_reason`` says why. Long handlers should
    check it (``step.cancelled.wait(t)`` is a cancellable sleep) and call
    :meth:`progress` well within ``timeout_ms``.
    """

    __slots__ = (
        "task_id",
        "step_id",
        "attempt_id",
        "step_name",
        "handler",
        "attempt",
        "max_attempts",
        "timeout_ms",
        "template",
        "context",
        "config",
        "inputs",
        "trace",
        "cancelled",
        "cancel_reason",
        "usage",
        "log",
        "started_at",
        "_progress_sink",
    )

    def __init__(
        self,
        data: Mapping[str, Any],
        progress_sink: Optional[ProgressSink] = None,
        logger: Optional[logging.Logger] = None,
    ) -> None:
        self.task_id: str = data["task_id"]
        self.step_id: str = data["step_id"]
        self.attempt_id: str = data["attempt_id"]
        self.step_name: str = data["step_name"]
        self.handler: str = data["handler"]
        self.attempt: int = _int(data.get("attempt"), 1)
        self.max_attempts: int = _int(data.get("max_attempts"), 1)
        self.timeout_ms: int = _int(data.get("timeout_ms"), 0)
        self.template: Dict[str, Any] = data.get("template") or {}
        self.context: Dict[str, Any] = data.get("context") or {}
        self.config: Dict[str, Any] = data.get("config") or {}
        self.inputs: Dict[str, Any] = data.get("inputs") or {}
        #: The attempt's trace context (:class:`Trace`), None when the broker sent none.
        self.trace: Optional[Trace] = Trace.of(data.get("trace"))
        self.cancelled = threading.Event()
        self.cancel_reason: Optional[str] = None
        #: Optional ``{cost, tokens, artifacts}`` stored with the attempt.
        self.usage: Dict[str, Any] = {}
        self.log = logging.LoggerAdapter(
            logger or logging.getLogger("stepbroker_handlers.step"),
            {"task_id": self.task_id, "step_id": self.step_id, "attempt_id": self.attempt_id},
        )
        self.started_at = time.monotonic()
        self._progress_sink = progress_sink

    @property
    def is_last_attempt(self) -> bool:
        return self.attempt >= self.max_attempts

    def progress(self, fraction: Optional[float] = None, message: Optional[str] = None) -> None:
        """Report that the attempt is still working; extends its lease.

        ``fraction`` is clamped to 0..1, ``message`` cut to 1024 characters.
        Safe to call from the handler's thread at any rate: reports are
        coalesced and sent by the pool's loop.
        """
        if fraction is not None:
            fraction = min(1.0, max(0.0, float(fraction)))
        if message is not None:
            message = str(message)[:1024]
        if self._progress_sink is not None:
            self._progress_sink(self.attempt_id, fraction, message)

    def __repr__(self) -> str:
        return (
            f"Step(handler={self.handler!r}, step_name={self.step_name!r}, task_id={self.task_id}, "
            f"step_id={self.step_id}, attempt_id={self.attempt_id}, attempt={self.attempt}/{self.max_attempts})"
        )
