"""A handler pool: a DEALER that speaks stepbroker/1 and runs handlers in threads.

One loop thread owns the ZeroMQ socket. It receives and validates what the
broker sends, hands steps to ``capacity`` worker threads, collects their
results and progress (through a thread-safe queue and a wake-up socket pair
that the same ``zmq.Poller`` watches), sends results, progress and
heartbeats, watches the broker's liveness and reconnects. Heartbeats come
from this loop, so a pool whose loop is stuck stops heartbeating.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import queue
import secrets
import signal
import socket
import threading
import time
import uuid
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Tuple, Union

import zmq

from . import __version__
from .errors import Cancelled
from .protocol import (
    BROKER_TO_POOL,
    ENCODINGS,
    HEARTBEAT_INTERVAL_MS,
    HEARTBEAT_LIVENESS,
    INVALID_OUTPUT,
    JSON,
    MAX_BATCH,
    MAX_MESSAGE_BYTES,
    MAX_VALUE_DEPTH,
    NAME_RE,
    OUTPUT_TOO_LARGE,
    UNKNOWN_HANDLER,
    Codec,
    Message,
    ProtocolError,
    as_int,
    encode_body,
    frame,
    storable_text,
    value_problem,
)
from .step import Step

Handler = Callable[[Step], Any]

log = logging.getLogger("stepbroker_handlers")

_QUEUED, _RUNNING, _DONE, _DROPPED = "queued", "running", "done", "dropped"
_MAX_IDS = 10000
_DEFAULT_DRAIN_S = 30.0


class _Attempt:
    __slots__ = ("step", "fn", "state")

    def __init__(self, step: Step, fn: Handler) -> None:
        self.step = step
        self.fn = fn
        self.state = _QUEUED


def default_pool_id(prefix: str = "py") -> str:
    """``<prefix>-<host>-<pid>-<random>``, at most 128 characters."""
    host = socket.gethostname().split(".")[0] or "host"
    return f"{prefix}-{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"[:128]


def _jsonable(value: Any) -> Any:
    """The value as the broker will store it (tuples become lists, ...)."""
    return json.loads(json.dumps(value, allow_nan=False))


def invalid_output_item(attempt_id: str, message: str) -> Dict[str, Any]:
    """A permanent ``invalid_output`` error: retrying would produce the same output again."""
    return {
        "attempt_id": attempt_id,
        "status": "error",
        "error": {"type": INVALID_OUTPUT, "message": storable_text(message[:8192]), "retryable": False},
    }


def completed_item(attempt_id: str, out: Any) -> Dict[str, Any]:
    """The RESULT entry for a handler that returned ``out``, or an ``invalid_output`` error.

    What the broker would refuse (and this pool then resend forever) becomes the step's error
    instead, in the same words as the Node SDK.
    """
    try:
        output = _jsonable(out)
    except (TypeError, ValueError, RecursionError) as exc:
        return invalid_output_item(attempt_id, f"the handler's return value is not JSON: {exc}")
    problem = value_problem(output, MAX_VALUE_DEPTH)
    if problem:
        code, what, where = problem
        hint = (
            " (PostgreSQL stores no U+0000 or unpaired surrogate; send bytes as base64)"
            if code == "unstorable_value"
            else ""
        )
        return invalid_output_item(
            attempt_id, f"the handler's output cannot be stored: at {where or '(the output)'}, {what}{hint}"
        )
    return {"attempt_id": attempt_id, "status": "complete", "output": output}


def error_item(attempt_id: str, exc: BaseException) -> Dict[str, Any]:
    """The RESULT entry for a handler that raised ``exc``."""
    code = getattr(exc, "code", None)
    etype = code if isinstance(code, str) and 0 < len(code) <= 128 else type(exc).__name__[:128]
    message = getattr(exc, "message", None)
    if not isinstance(message, str) or not message:
        message = str(exc) or type(exc).__name__
    err: Dict[str, Any] = {
        "type": etype,
        # Only reported, so an unstorable character in it must not cost the whole result.
        "message": storable_text(message[:8192]),
        "retryable": bool(getattr(exc, "retryable", True)),
    }
    ra = getattr(exc, "retry_after_ms", None)
    if isinstance(ra, (int, float)) and not isinstance(ra, bool):
        err["retry_after_ms"] = int(min(max(ra, 0), 86_400_000))
    details = getattr(exc, "details", None)
    if isinstance(details, dict):
        try:
            d = _jsonable(details)
            # Details the broker would refuse are dropped like details JSON cannot carry.
            if value_problem(d, MAX_VALUE_DEPTH) is None:
                err["details"] = d
        except (TypeError, ValueError, RecursionError):
            pass
    return {"attempt_id": attempt_id, "status": "error", "error": err}


def _usage(u: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    out: Dict[str, Any] = {}
    cost = u.get("cost")
    if isinstance(cost, (int, float)) and not isinstance(cost, bool) and cost >= 0:
        out["cost"] = cost
    tokens = u.get("tokens")
    if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0:
        out["tokens"] = tokens
    arts = u.get("artifacts")
    if isinstance(arts, (list, tuple)):
        out["artifacts"] = [str(a)[:2048] for a in arts if str(a)][:1000]
    return out or None


class HandlerPool:
    """A pool of Python handlers served to one stepbroker broker.

    >>> pool = HandlerPool("tcp://127.0.0.1:5555", capacity=4)
    >>> @pool.handler("process_payment")
    ... def process_payment(step):
    ...     return {"charged": step.inputs["validate_order"]["amount"]}
    >>> pool.run()   # blocks until close(), SIGTERM or SIGINT

    ``encoding`` is asked for in HELLO; the broker's WELCOME decides.
    ``schema_dir``/``validate`` control JSON Schema validation of received
    bodies (on by default when ``jsonschema`` is installed and
    ``protocol/schemas`` is found; see :func:`protocol.find_schema_dir`).
    ``curve_serverkey`` (Z85) turns on CURVE; the pool's own key pair is
    ``curve_publickey``/``curve_secretkey`` or generated once.
    """

    def __init__(
        self,
        endpoint: str,
        capacity: int = 4,
        encoding: str = "msgpack",
        pool_id: Optional[str] = None,
        handlers: Optional[Mapping[str, Handler]] = None,
        *,
        labels: Optional[Mapping[str, Any]] = None,
        schema_dir: Union[str, os.PathLike, None] = None,
        validate: Optional[bool] = None,
        curve_serverkey: Union[str, bytes, None] = None,
        curve_publickey: Union[str, bytes, None] = None,
        curve_secretkey: Union[str, bytes, None] = None,
        drain_timeout: float = _DEFAULT_DRAIN_S,
        reconnect_backoff: Tuple[float, float] = (0.1, 5.0),
        context: Optional[zmq.Context] = None,
        logger: Optional[logging.Logger] = None,
    ) -> None:
        if not isinstance(capacity, int) or not 1 <= capacity <= 10000:
            raise ValueError("capacity must be an integer in 1..10000")
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}")
        self.endpoint = endpoint
        self.capacity = capacity
        self.encoding = encoding
        self.pool_id = pool_id or default_pool_id()
        if not 1 <= len(self.pool_id.encode("utf-8")) <= 128 or self.pool_id.startswith("\0"):
            raise ValueError("pool_id must be 1..128 bytes and not start with a zero byte")
        self.labels = dict(labels) if labels else None
        # Proves to the broker that a HELLO comes from this process: only a HELLO carrying it may
        # take over this pool_id's registration or adopt its attempts. One per process, sent in
        # every HELLO (reconnects included), never logged.
        self._session = secrets.token_urlsafe(24)
        self.drain_timeout = drain_timeout
        self.log = logger or log
        self.codec = Codec.create(schema_dir, validate)
        self._handlers: Dict[str, Handler] = {}

        self._ctx = context or zmq.Context.instance()
        self._curve: Optional[Tuple[bytes, bytes, bytes]] = None
        if curve_serverkey is not None:
            if not zmq.has("curve"):
                raise RuntimeError("this libzmq has no CURVE support")
            if curve_publickey is None or curve_secretkey is None:
                curve_publickey, curve_secretkey = zmq.curve_keypair()
            self._curve = tuple(  # type: ignore[assignment]
                k.encode("ascii") if isinstance(k, str) else bytes(k)
                for k in (curve_serverkey, curve_publickey, curve_secretkey)
            )
        self._backoff_min, self._backoff_max = reconnect_backoff

        # Cross-thread plumbing.
        self._events: "queue.SimpleQueue[Tuple[Any, ...]]" = queue.SimpleQueue()
        self._work: "queue.SimpleQueue[Optional[_Attempt]]" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._wake_r: Optional[socket.socket] = None
        self._wake_w: Optional[socket.socket] = None
        self._welcomed_evt = threading.Event()
        self._running_evt = threading.Event()
        self._stopped = threading.Event()
        self._started = False
        self._thread: Optional[threading.Thread] = None
        self._loop_thread_id: Optional[int] = None
        self._workers: List[threading.Thread] = []

        # Loop-thread state.
        self._sock: Optional[zmq.Socket] = None
        self._poller = zmq.Poller()
        self._outbox: Deque[Tuple[str, List[bytes]]] = deque()
        self._attempts: Dict[str, _Attempt] = {}
        self._unacked: Dict[str, Dict[str, Any]] = {}
        self._sent_at: Dict[str, float] = {}  # attempt_id -> when its RESULT was last sent
        self._progress: Dict[str, Dict[str, Any]] = {}
        self._handed_back: List[str] = []
        # Attempts the broker cancelled (or that we handed back) whose handler thread still runs:
        # each still takes a worker, so HEARTBEAT `cancelling` lists them and the broker keeps
        # their slots counted against our credit until one returns.
        self._lingering: Dict[str, _Attempt] = {}
        self._welcomed = False
        self._broker_id: Optional[str] = None
        self._send_encoding = JSON
        self._hb_s = HEARTBEAT_INTERVAL_MS / 1000.0
        self._liveness = HEARTBEAT_LIVENESS
        self._max_bytes = MAX_MESSAGE_BYTES
        self._max_batch = MAX_BATCH
        self._hello_sent_at = 0.0
        self._hello_running: set = set()
        self._last_recv = 0.0
        self._last_send = 0.0
        self._last_resend_check = 0.0
        self._reconnect_at: Optional[float] = None
        self._backoff = self._backoff_min
        self._closing = False
        self._close_deadline = 0.0
        self._disconnect_sent = False
        self._done = False
        self.last_error: Optional[Dict[str, Any]] = None
        for name, fn in (handlers or {}).items():
            self.add_handler(name, fn)

    # --- registration ---------------------------------------------------------

    def add_handler(self, name: str, fn: Handler) -> None:
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ValueError(f"handler name {name!r} does not match {NAME_RE.pattern}")
        if self._started:
            raise RuntimeError("register handlers before start()/run()")
        self._handlers[name] = fn

    def handler(self, name: Optional[str] = None) -> Callable[[Handler], Handler]:
        """Decorator: ``@pool.handler("name")`` (default: the function's name)."""

        def deco(fn: Handler) -> Handler:
            self.add_handler(name or fn.__name__, fn)
            return fn

        return deco

    @property
    def handlers(self) -> List[str]:
        return list(self._handlers)

    @property
    def welcomed(self) -> bool:
        return self._welcomed

    @property
    def broker_id(self) -> Optional[str]:
        return self._broker_id

    @property
    def validating(self) -> bool:
        return self.codec.validating

    def wait_started(self, timeout: Optional[float] = None) -> bool:
        """Block until the loop runs (socket connecting, HELLO sent or queued)."""
        return self._running_evt.wait(timeout)

    def wait_closed(self, timeout: Optional[float] = None) -> bool:
        """Block until the pool has closed."""
        return self._stopped.wait(timeout)

    def wait_welcome(self, timeout: Optional[float] = None) -> bool:
        """Block until a WELCOME has been received (True) or ``timeout`` passes."""
        return self._welcomed_evt.wait(timeout)

    # --- lifecycle --------------------------------------------------------------

    def start(self) -> "HandlerPool":
        """Run the pool's loop in a background thread; returns at once."""
        self._prepare()
        self._thread = threading.Thread(target=self._run_loop, name=f"stepbroker-pool-{self.pool_id}", daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        """Run the pool in this thread until close(), SIGTERM or SIGINT.

        In the main thread, SIGTERM and SIGINT start a graceful close (a
        second signal closes at once).
        """
        self._prepare()
        restore: Dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            hits = [0]

            def on_signal(signum: int, _frame: Any) -> None:
                hits[0] += 1
                self.log.info("pool %s: signal %d, closing%s", self.pool_id, signum, " now" if hits[0] > 1 else "")
                self._request_close(0.0 if hits[0] > 1 else None)

            for sig in (signal.SIGTERM, signal.SIGINT):
                restore[sig] = signal.signal(sig, on_signal)
        try:
            self._run_loop()
        finally:
            for sig, old in restore.items():
                signal.signal(sig, old)

    def close(self, drain_timeout: Optional[float] = None) -> None:
        """Close gracefully and wait for the loop to end.

        Steps not yet started are handed back at once; running ones get up
        to ``drain_timeout`` seconds (default: the pool's ``drain_timeout``)
        to finish and have their results acknowledged. ``drain_timeout=0``
        hands back everything and sets every step's ``cancelled``.
        """
        if not self._started:
            return
        self._request_close(drain_timeout)
        if threading.get_ident() == self._loop_thread_id:
            return  # called from a handler or signal handler on the loop thread
        limit = (self.drain_timeout if drain_timeout is None else drain_timeout) + 5.0
        self._stopped.wait(limit)
        if self._thread is not None:
            self._thread.join(1.0)

    def __enter__(self) -> "HandlerPool":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _request_close(self, drain_timeout: Optional[float]) -> None:
        self._events.put(("close", self.drain_timeout if drain_timeout is None else drain_timeout))
        self._wake()

    def _prepare(self) -> None:
        if self._started:
            raise RuntimeError("a HandlerPool runs once")
        if not self._handlers:
            raise RuntimeError("register at least one handler before start()/run()")
        self._started = True
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        for i in range(self.capacity):
            t = threading.Thread(target=self._worker, name=f"stepbroker-worker-{i}", daemon=True)
            t.start()
            self._workers.append(t)

    def _wake(self) -> None:
        w = self._wake_w
        if w is None:
            return
        try:
            w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake, or closed

    # --- worker threads ---------------------------------------------------------

    def _worker(self) -> None:
        while True:
            att = self._work.get()
            if att is None:
                return
            with self._lock:
                if att.state != _QUEUED:
                    continue
                att.state = _RUNNING
            step = att.step
            t0 = time.monotonic()
            try:
                out = att.fn(step)
                if inspect.iscoroutine(out):
                    out = asyncio.run(out)
                item: Dict[str, Any] = completed_item(step.attempt_id, out)
                if item["status"] == "error":
                    step.log.error("handler %s returned an output it cannot send: %s",
                                   step.handler, item["error"]["message"])
            except BaseException as exc:  # noqa: BLE001 - every failure becomes a result
                item = error_item(step.attempt_id, exc)
                if not isinstance(exc, (Exception, Cancelled)):
                    step.log.error("handler %s raised %s", step.handler, type(exc).__name__)
            item["duration_ms"] = round((time.monotonic() - t0) * 1000.0, 3)
            if step.usage:
                u = _usage(step.usage)
                if u:
                    item["usage"] = u
            self._events.put(("done", step.attempt_id, item))
            self._wake()

    def _on_progress(self, attempt_id: str, fraction: Optional[float], message: Optional[str]) -> None:
        self._events.put(("progress", attempt_id, fraction, message))
        self._wake()

    # --- the loop ---------------------------------------------------------------

    def _run_loop(self) -> None:
        self._loop_thread_id = threading.get_ident()
        assert self._wake_r is not None
        self.log.info(
            "pool %s: serving %s with capacity %d on %s (validation %s)",
            self.pool_id, ",".join(self._handlers), self.capacity, self.endpoint,
            "on" if self.validating else "off",
        )
        try:
            self._connect()
            self._running_evt.set()
            while not self._done:
                timeout = self._poll_timeout_ms()
                try:
                    ready = dict(self._poller.poll(timeout))
                except zmq.ZMQError as exc:
                    if exc.errno == zmq.EINTR:
                        continue
                    raise
                if self._wake_r.fileno() in ready:
                    self._drain_wake()
                sock = self._sock
                if sock is not None and sock in ready:
                    if ready[sock] & zmq.POLLOUT:
                        self._flush_outbox()
                    if ready[sock] & zmq.POLLIN:
                        self._receive_all()
                self._drain_events()
                self._tick(time.monotonic())
        except Exception:
            self.log.exception("pool %s: loop failed", self.pool_id)
            raise
        finally:
            self._shutdown()

    def _poll_timeout_ms(self) -> int:
        now = time.monotonic()
        if self._reconnect_at is not None:
            return max(0, int((self._reconnect_at - now) * 1000) + 1)
        # Wake often enough for heartbeats, liveness, HELLO resends and drain.
        t = min(self._hb_s / 2.0, 0.25)
        if self._closing:
            t = min(t, max(0.0, self._close_deadline - now))
        return max(1, int(t * 1000))

    def _drain_wake(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    # --- socket management ----------------------------------------------------------

    def _connect(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.pool_id.encode("utf-8"))
        sock.setsockopt(zmq.LINGER, 0)
        # Queue only to completed connections: a send with no broker gives
        # EAGAIN and stays in our outbox, so stale HELLOs do not pile up.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        if self._curve is not None:
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = self._curve
        sock.connect(self.endpoint)
        self._sock = sock
        self._outbox.clear()
        self._poller = zmq.Poller()
        assert self._wake_r is not None
        self._poller.register(self._wake_r.fileno(), zmq.POLLIN)
        self._poller.register(sock, zmq.POLLIN)
        self._reconnect_at = None
        self._welcomed = False
        self._last_recv = time.monotonic()
        self._send_hello()

    def _disconnect_socket(self) -> None:
        if self._sock is not None:
            try:
                self._poller.unregister(self._sock)
            except KeyError:
                pass
            self._sock.close(linger=0)
            self._sock = None
        self._outbox.clear()
        self._welcomed = False
        self._welcomed_evt.clear()

    def _reconnect(self, why: str, min_delay: float = 0.0) -> None:
        """Close the socket; open a new one with the same routing id after a backoff."""
        delay = max(self._backoff, min_delay)
        self.log.warning("pool %s: %s; reconnecting in %.2f s", self.pool_id, why, delay)
        self._disconnect_socket()
        self._reconnect_at = time.monotonic() + delay
        self._backoff = min(self._backoff * 2, self._backoff_max)

    def _send_hello(self) -> None:
        running = [a for a, att in self._attempts.items() if att.state in (_QUEUED, _RUNNING)]
        running += [a for a in self._unacked if a not in self._attempts]
        body: Dict[str, Any] = {
            "pool_id": self.pool_id,
            "handlers": list(self._handlers),
            "capacity": self.capacity,
            "encoding": self.encoding,
            "sdk": {"language": "python", "name": "stepbroker-handlers", "version": __version__},
            "session": self._session,
            # Step.trace reads it (PROTOCOL.md, Trace context)
            "trace_context": True,
        }
        if running:
            body["running"] = running[:_MAX_IDS]
        if self.labels:
            body["labels"] = self.labels
        self._hello_running = set(running)
        # Never queue two HELLOs: replace one still waiting in the outbox.
        self._outbox = deque(m for m in self._outbox if m[0] != "HELLO")
        self._send("HELLO", body, encoding=JSON)
        self._hello_sent_at = time.monotonic()
        self.log.debug("pool %s: HELLO sent (running=%d)", self.pool_id, len(running))

    def _send(self, command: str, body: Mapping[str, Any], encoding: Optional[str] = None) -> None:
        if self._sock is None:
            return
        frames = frame(command, body, encoding or (self._send_encoding if self._welcomed else JSON))
        if self._outbox:
            self._outbox.append((command, frames))
            return
        if self._try_send(frames):
            return
        self._outbox.append((command, frames))
        self._poller.register(self._sock, zmq.POLLIN | zmq.POLLOUT)

    def _try_send(self, frames: List[bytes]) -> bool:
        assert self._sock is not None
        try:
            self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=True)
        except zmq.Again:
            return False  # back-pressure: keep it and retry when writable
        self._last_send = time.monotonic()
        return True

    def _flush_outbox(self) -> None:
        while self._outbox and self._sock is not None:
            if not self._try_send(self._outbox[0][1]):
                return
            self._outbox.popleft()
        if self._sock is not None:
            self._poller.register(self._sock, zmq.POLLIN)

    # --- receiving -----------------------------------------------------------------

    def _receive_all(self) -> None:
        for _ in range(1000):
            sock = self._sock
            if sock is None:
                return
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            self._last_recv = time.monotonic()
            self._on_frames(frames)

    def _on_frames(self, frames: List[bytes]) -> None:
        try:
            msg = self.codec.decode(frames, accept=BROKER_TO_POOL)
        except ProtocolError as err:
            is_error = len(frames) >= 2 and bytes(frames[1]) == b"ERROR"
            self.log.warning("pool %s: bad message from broker: %s", self.pool_id, err)
            # Never answer an ERROR with an ERROR; nothing but HELLO before WELCOME.
            if not is_error and self._welcomed:
                self._send("ERROR", err.to_body())
            return
        except Exception as exc:  # noqa: BLE001 - never crash on input
            self.log.exception("pool %s: failed to decode a message", self.pool_id)
            if self._welcomed and not (len(frames) >= 2 and bytes(frames[1]) == b"ERROR"):
                self._send("ERROR", {"code": "internal_error", "message": f"decoding failed: {type(exc).__name__}"})
            return
        try:
            getattr(self, "_on_" + msg.command.lower())(msg)
        except Exception as exc:  # noqa: BLE001
            self.log.exception("pool %s: failed handling %s", self.pool_id, msg.command)
            if self._welcomed and msg.command != "ERROR":
                self._send(
                    "ERROR",
                    {"code": "internal_error", "message": f"{type(exc).__name__} handling {msg.command}",
                     "command": msg.command},
                )

    def _on_welcome(self, msg: Message) -> None:
        b = msg.body
        self._broker_id = b.get("broker_id")
        self._send_encoding = b["encoding"]
        self._hb_s = as_int(b["heartbeat_ms"]) / 1000.0  # type: ignore[operator]
        self._liveness = as_int(b["heartbeat_liveness"]) or HEARTBEAT_LIVENESS
        self._max_bytes = as_int(b["max_message_bytes"]) or MAX_MESSAGE_BYTES
        self._max_batch = as_int(b["max_batch"]) or MAX_BATCH
        self._welcomed = True
        self._backoff = self._backoff_min
        adopted = set(b.get("adopted") or [])
        self.log.info(
            "pool %s: welcomed by broker %s (encoding %s, heartbeat %d ms x %d, max_batch %d, adopted %d)",
            self.pool_id, self._broker_id, self._send_encoding, int(self._hb_s * 1000), self._liveness,
            self._max_batch, len(adopted),
        )
        # Attempts we reported as running that the broker did not adopt: their
        # results will be refused as stale, so stop them.
        for aid in self._hello_running - adopted:
            att = self._attempts.get(aid)
            if att is not None:
                self._cancel(att, "lease_lost", "not adopted after reconnect")
        self._hello_running = set()
        # Resend every unacknowledged result.
        self._sent_at.clear()
        if self._closing and not self._disconnect_sent:
            self._send_disconnect()
        self._welcomed_evt.set()

    def _on_step(self, msg: Message) -> None:
        if not self._welcomed:
            self.log.warning("pool %s: STEP before WELCOME ignored", self.pool_id)
            return
        late: List[str] = []
        for s in msg.body["steps"]:
            aid = s["attempt_id"]
            if aid in self._attempts or aid in self._unacked:
                self.log.warning("pool %s: attempt %s dispatched twice; ignored", self.pool_id, aid)
                continue
            if self._closing:
                late.append(aid)
                continue
            fn = self._handlers.get(s["handler"])
            if fn is None:
                self.log.error(
                    "pool %s: no handler %r for attempt %s (task %s step %s)",
                    self.pool_id, s["handler"], aid, s.get("task_id"), s.get("step_id"),
                )
                self._add_result(
                    {
                        "attempt_id": aid,
                        "status": "error",
                        "error": {
                            "type": UNKNOWN_HANDLER,
                            "message": f"pool {self.pool_id} does not serve handler {s['handler']!r}",
                            "retryable": True,
                        },
                    }
                )
                continue
            step = Step(s, self._on_progress, self.log)
            att = _Attempt(step, fn)
            self._attempts[aid] = att
            step.log.debug("attempt %s (task %s, step %s %s) dispatched", aid, step.task_id, step.step_id, step.handler)
            self._work.put(att)
        if len(self._attempts) > self.capacity:
            self.log.warning(
                "pool %s: %d attempts in flight, over capacity %d; extra ones wait for a worker",
                self.pool_id, len(self._attempts), self.capacity,
            )
        if late:
            self.log.info("pool %s: closing; handing back %d late steps", self.pool_id, len(late))
            self._handed_back.extend(late)
            self._send("DISCONNECT", {"reason": "pool closing", "handed_back": late[:_MAX_IDS]})

    def _on_ack(self, msg: Message) -> None:
        for a in msg.body["acks"]:
            aid, outcome = a["attempt_id"], a.get("outcome")
            if self._unacked.pop(aid, None) is None:
                self.log.debug("pool %s: ACK for unknown attempt %s", self.pool_id, aid)
                continue
            self._sent_at.pop(aid, None)
            level = logging.DEBUG if outcome in ("stored", "duplicate") else logging.INFO
            self.log.log(level, "pool %s: attempt %s acknowledged: %s", self.pool_id, aid, outcome)

    def _on_cancel(self, msg: Message) -> None:
        for c in msg.body["cancels"]:
            att = self._attempts.get(c["attempt_id"])
            if att is None:
                continue
            self._cancel(att, c.get("reason", "unknown"), "cancelled by the broker")

    def _cancel(self, att: _Attempt, reason: str, why: str) -> None:
        step = att.step
        step.cancel_reason = reason
        step.cancelled.set()
        with self._lock:
            never_started = att.state == _QUEUED
            if never_started:
                att.state = _DROPPED
            running = att.state == _RUNNING
        if never_started:
            # Not started: drop it; the broker has released its credit.
            self._attempts.pop(step.attempt_id, None)
            self._progress.pop(step.attempt_id, None)
        elif running:
            self._lingering[step.attempt_id] = att
        step.log.info(
            "attempt %s (task %s, step %s) %s (%s)%s", step.attempt_id, step.task_id, step.step_id, why, reason,
            "; dropped before it started" if never_started else "",
        )

    def _on_heartbeat(self, msg: Message) -> None:
        pass

    def _on_disconnect(self, msg: Message) -> None:
        code = msg.body.get("code")
        reason = msg.body.get("reason", "")
        if self._closing:
            self.log.info("pool %s: broker disconnected us while closing (%s %s)", self.pool_id, code, reason)
            self._done = True
            return
        window = self._hb_s * self._liveness
        self._reconnect(f"broker sent DISCONNECT ({code or 'no code'}: {reason})",
                        min_delay=window if code in ("too_many_errors", "over_budget") else 0.0)

    def _on_error(self, msg: Message) -> None:
        b = msg.body
        code = b.get("code")
        self.last_error = dict(b)
        if code == "hello_required":
            # The broker does not know us (it restarted). Re-HELLO, once per
            # burst: every message queued before it gets the same answer.
            if not self._welcomed and time.monotonic() - self._hello_sent_at < self._hb_s:
                return
            self.log.warning("pool %s: broker says hello_required; sending HELLO", self.pool_id)
            self._welcomed = False
            self._welcomed_evt.clear()
            self._send_hello()
        elif code == "shutting_down":
            self._reconnect("broker is shutting down")
        elif code in ("hello_rejected",) or (b.get("command") == "HELLO"):
            self.log.error("pool %s: HELLO refused: %s %s", self.pool_id, code, b.get("message"))
        elif code == "unknown_attempt" and b.get("attempt_id"):
            self._progress.pop(b["attempt_id"], None)
            self.log.info("pool %s: broker does not know attempt %s", self.pool_id, b["attempt_id"])
        else:
            self.log.warning(
                "pool %s: broker ERROR %s on %s: %s (at %s)",
                self.pool_id, code, b.get("command"), b.get("message"), b.get("instance_path"),
            )

    # --- events from workers ------------------------------------------------------------

    def _drain_events(self) -> None:
        returned = False
        while True:
            try:
                ev = self._events.get_nowait()
            except queue.Empty:
                break
            kind = ev[0]
            if kind == "done":
                _, aid, item = ev
                gone = self._lingering.pop(aid, None)
                if gone is not None:
                    returned = True
                    st = gone.step
                    st.log.info(
                        "attempt %s (task %s, step %s) returned after it was %s; its worker is free again",
                        aid, st.task_id, st.step_id,
                        "handed back" if st.cancel_reason == "shutdown" else f"cancelled ({st.cancel_reason})",
                    )
                att = self._attempts.pop(aid, None)
                self._progress.pop(aid, None)
                if att is None or att.state == _DROPPED:
                    continue
                att.state = _DONE
                st = att.step
                if item["status"] == "complete":
                    st.log.debug("attempt %s (task %s, step %s) complete", aid, st.task_id, st.step_id)
                else:
                    e = item["error"]
                    st.log.info(
                        "attempt %s (task %s, step %s) failed: %s: %s (retryable=%s)",
                        aid, st.task_id, st.step_id, e["type"], e["message"][:200], e["retryable"],
                    )
                self._add_result(item)
            elif kind == "progress":
                _, aid, fraction, message = ev
                if aid not in self._attempts:
                    continue
                p: Dict[str, Any] = {"attempt_id": aid}
                if fraction is not None:
                    p["fraction"] = fraction
                if message is not None:
                    p["message"] = message
                self._progress[aid] = p
            elif kind == "close":
                self._begin_close(float(ev[1]))
        if returned:
            # The broker counts those slots as taken until a HEARTBEAT stops listing them: say so now.
            self._heartbeat()

    def _add_result(self, item: Dict[str, Any]) -> None:
        self._unacked[item["attempt_id"]] = item

    # --- periodic work --------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        if self._closing:
            self._check_closed(now)
            if self._done:
                return
        if self._reconnect_at is not None:
            if now >= self._reconnect_at:
                self._connect()
            return
        window = self._hb_s * self._liveness
        if self._welcomed:
            if now - self._last_recv > window:
                self._reconnect(f"no message from broker for {now - self._last_recv:.2f} s")
                return
            self._flush_results(now, window)
            self._flush_progress()
            if now - self._last_send >= self._hb_s and not self._outbox:
                self._heartbeat()
        elif now - self._hello_sent_at >= window:
            self.log.info("pool %s: no WELCOME within %.2f s; sending HELLO again", self.pool_id, window)
            self._send_hello()

    def _heartbeat(self) -> None:
        """A HEARTBEAT now; always with ``cancelling``, so the broker knows which cancelled handlers still run."""
        if not self._welcomed:
            return
        self._send(
            "HEARTBEAT",
            {"in_flight": len(self._attempts), "cancelling": list(self._lingering)[:_MAX_IDS]},
        )

    def _flush_results(self, now: float, window: float) -> None:
        if not self._unacked or self._outbox:
            return
        # MAY resend results that have had no ACK for a liveness window.
        if now - self._last_resend_check >= window:
            self._last_resend_check = now
            for aid in [a for a, t in self._sent_at.items() if now - t > window]:
                del self._sent_at[aid]
        pending = [aid for aid in self._unacked if aid not in self._sent_at]
        if not pending:
            return
        enc = self._send_encoding
        limit = self._max_bytes
        batch: List[Dict[str, Any]] = []
        size = 16
        for aid in pending:
            item = self._unacked[aid]
            n = len(encode_body(item, enc)) + 1
            if n + 16 > limit:
                item = self._too_large(item, n, limit)
                n = len(encode_body(item, enc)) + 1
            if batch and (len(batch) >= self._max_batch or size + n > limit):
                self._send("RESULT", {"results": batch})
                batch, size = [], 16
            batch.append(item)
            size += n
            self._sent_at[aid] = now
        if batch:
            self._send("RESULT", {"results": batch})

    def _too_large(self, item: Dict[str, Any], n: int, limit: int) -> Dict[str, Any]:
        aid = item["attempt_id"]
        self.log.error("pool %s: result of attempt %s is %d bytes, over the broker's %d; sent as an error",
                       self.pool_id, aid, n, limit)
        new: Dict[str, Any] = {
            "attempt_id": aid,
            "status": "error",
            "error": {
                "type": OUTPUT_TOO_LARGE,
                "message": f"the result is {n} bytes, over the broker's max_message_bytes of {limit}",
                "retryable": False,
            },
        }
        if "duration_ms" in item:
            new["duration_ms"] = item["duration_ms"]
        self._unacked[aid] = new
        return new

    def _flush_progress(self) -> None:
        if not self._progress or self._outbox:
            return
        items = list(self._progress.values())
        self._progress.clear()
        for i in range(0, len(items), self._max_batch):
            self._send("PROGRESS", {"progress": items[i : i + self._max_batch]})

    # --- closing ---------------------------------------------------------------------------------

    def _begin_close(self, drain_timeout: float) -> None:
        now = time.monotonic()
        if self._closing:
            # A second close may shorten the deadline.
            self._close_deadline = min(self._close_deadline, now + drain_timeout)
            if drain_timeout > 0:
                return
        self._closing = True
        self._close_deadline = now + max(0.0, drain_timeout)
        handed: List[str] = []
        for aid, att in list(self._attempts.items()):
            with self._lock:
                running = att.state == _RUNNING
                hand_back = att.state == _QUEUED or (drain_timeout <= 0 and running)
                if hand_back:
                    att.state = _DROPPED
            if hand_back:
                att.step.cancel_reason = "shutdown"
                att.step.cancelled.set()
                del self._attempts[aid]
                if running:
                    self._lingering[aid] = att
                self._progress.pop(aid, None)
                handed.append(aid)
        self._handed_back.extend(handed)
        self.log.info(
            "pool %s: closing (drain %.1f s): %d handed back, %d running, %d results awaiting ACK",
            self.pool_id, drain_timeout, len(handed), len(self._attempts), len(self._unacked),
        )
        if self._welcomed and not self._disconnect_sent:
            self._send_disconnect()
        self._check_closed(now)

    def _send_disconnect(self) -> None:
        body: Dict[str, Any] = {"reason": "pool closing"}
        if self._handed_back:
            body["handed_back"] = self._handed_back[:_MAX_IDS]
        self._send("DISCONNECT", body)
        self._disconnect_sent = True

    def _check_closed(self, now: float) -> None:
        if self._done:
            return
        if not self._attempts and not self._unacked:
            self._done = True
        elif now >= self._close_deadline:
            self.log.warning(
                "pool %s: drain timeout: abandoning %d running attempts and %d unacknowledged results",
                self.pool_id, len(self._attempts), len(self._unacked),
            )
            self._done = True

    def _shutdown(self) -> None:
        for att in list(self._attempts.values()):
            if att.step.cancel_reason is None:
                att.step.cancel_reason = "shutdown"
            att.step.cancelled.set()
        if self._outbox and self._sock is not None:
            self._flush_outbox()  # a last try for DISCONNECT; linger 0 follows
        self._disconnect_socket()
        for _ in self._workers:
            self._work.put(None)
        for s in (self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        self._wake_w = None
        self._done = True
        self._stopped.set()
        self.log.info("pool %s: closed", self.pool_id)
