"""A pool of built-in test handlers, run as a child process by end-to-end tests.

    python -m stepbroker_handlers.testpool --endpoint ipc:///tmp/x \\
        --handlers echo,sleep --capacity 2 --pool-id py1 [--encoding msgpack]

Prints ``READY <pool_id>`` on stdout once the pool has started (its socket is
connecting and HELLO is on its way), and ``WELCOMED <pool_id> <broker_id>``
after each WELCOME. SIGTERM or SIGINT closes it gracefully; exit status 0.

Handlers (select with --handlers; ``name=builtin`` serves a builtin under
another name):

- ``echo``: returns ``{"inputs", "context", "config", "lang": "python", ...}``
- ``sleep``: sleeps ``config.ms`` (default 100), stops early on cancel
- ``fail_then_succeed``: fails ``config.failures`` times (default 1) per
  step_id, counted in files under --state-dir, then succeeds
- ``permanent``: raises PermanentError
- ``hang``: sleeps ``config.ms`` (default: forever), ignoring cancel
- ``progress``: reports progress ``config.reports`` times (default 3) over
  ``config.ms`` (default 300) ms
- ``noop``: returns None (a null output)
- ``unstorable``: what the broker cannot store, by ``config.kind``: ``nul``
  returns a string holding U+0000, ``deep`` a list 60 levels deep, ``raise``
  raises with U+0000 in the message
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from .errors import Cancelled, PermanentError, RetryableError
from .pool import HandlerPool, default_pool_id
from .step import Step


def _ms(step: Step, default: Optional[float]) -> Optional[float]:
    v = step.config.get("ms", default)
    return None if v is None else float(v)


def echo(step: Step) -> Dict[str, Any]:
    out: Dict[str, Any] = {
        "inputs": step.inputs,
        "context": step.context,
        "config": step.config,
        "lang": "python",
        "handler": step.handler,
        "step_name": step.step_name,
        "attempt": step.attempt,
    }
    if step.trace is not None:
        out["trace"] = {"traceparent": step.trace.traceparent, "trace_id": step.trace.trace_id,
                        "span_id": step.trace.span_id}
    return out


def sleep(step: Step) -> Dict[str, Any]:
    ms = _ms(step, 100.0) or 0.0
    if step.cancelled.wait(ms / 1000.0):
        raise Cancelled(f"cancelled after sleeping part of {ms:g} ms ({step.cancel_reason})")
    return {"slept_ms": ms, "lang": "python"}


def permanent(step: Step) -> None:
    raise PermanentError(str(step.config.get("message", "permanent failure requested by the test")))


def hang(step: Step) -> Dict[str, Any]:
    ms = _ms(step, None)
    end = None if ms is None else time.monotonic() + ms / 1000.0
    while end is None or time.monotonic() < end:
        time.sleep(0.05 if end is None else min(0.05, max(0.0, end - time.monotonic())))
    return {"hung_ms": ms, "lang": "python"}


def progress(step: Step) -> Dict[str, Any]:
    ms = _ms(step, 300.0) or 0.0
    reports = max(1, int(step.config.get("reports", 3)))
    for i in range(reports):
        if step.cancelled.wait(ms / 1000.0 / reports):
            raise Cancelled(f"cancelled at report {i} ({step.cancel_reason})")
        step.progress(fraction=(i + 1) / reports, message=f"{i + 1}/{reports}")
    return {"reports": reports, "lang": "python"}


def noop(step: Step) -> None:
    return None


def unstorable(step: Step) -> Any:
    kind = step.config.get("kind", "nul")
    if kind == "raise":
        raise PermanentError("bad \u0000 byte")
    if kind == "deep":
        v: Any = 1
        for _ in range(60):
            v = [v]
        return v
    return {"text": "x\u0000y", "lang": "python"}


def make_fail_then_succeed(state_dir: Path) -> Callable[[Step], Dict[str, Any]]:
    lock = threading.Lock()

    def fail_then_succeed(step: Step) -> Dict[str, Any]:
        failures = int(step.config.get("failures", 1))
        path = state_dir / f"{step.step_id}.count"
        with lock:
            try:
                import fcntl  # POSIX: several pools may share the state dir
            except ImportError:  # pragma: no cover
                fcntl = None  # type: ignore[assignment]
            with open(path, "a+", encoding="ascii") as fh:
                if fcntl is not None:
                    fcntl.flock(fh, fcntl.LOCK_EX)
                fh.seek(0)
                text = fh.read().strip()
                count = int(text) if text else 0
                fh.seek(0)
                fh.truncate()
                fh.write(str(count + 1))
        if count < failures:
            ra = step.config.get("retry_after_ms")
            raise RetryableError(
                f"planned failure {count + 1} of {failures}",
                code=str(step.config.get("error_type", "PlannedFailure")),
                retry_after_ms=int(ra) if ra is not None else None,
            )
        return {"failures": failures, "succeeded_on_run": count + 1, "attempt": step.attempt, "lang": "python"}

    return fail_then_succeed


BUILTINS = ("echo", "sleep", "fail_then_succeed", "permanent", "hang", "progress", "noop", "unstorable")


def build_handlers(spec: str, state_dir: Path) -> Dict[str, Callable[[Step], Any]]:
    table: Dict[str, Callable[[Step], Any]] = {
        "echo": echo,
        "sleep": sleep,
        "fail_then_succeed": make_fail_then_succeed(state_dir),
        "permanent": permanent,
        "hang": hang,
        "progress": progress,
        "noop": noop,
        "unstorable": unstorable,
    }
    out: Dict[str, Callable[[Step], Any]] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, builtin = part.partition("=")
        builtin = builtin or name
        if builtin not in table:
            raise SystemExit(f"testpool: unknown handler {builtin!r}; built-ins: {', '.join(BUILTINS)}")
        out[name] = table[builtin]
    if not out:
        raise SystemExit("testpool: --handlers names no handler")
    return out


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stepbroker_handlers.testpool", description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoint", required=True, help="broker endpoint, e.g. tcp://127.0.0.1:5555")
    p.add_argument("--handlers", default=",".join(BUILTINS), help="comma-separated built-ins (name or name=builtin)")
    p.add_argument("--capacity", type=int, default=4)
    p.add_argument("--pool-id", default=None)
    p.add_argument("--encoding", choices=("json", "msgpack"), default="json")
    p.add_argument("--state-dir", default=None, help="where fail_then_succeed counts runs (default: a temp dir)")
    p.add_argument("--drain-timeout", type=float, default=10.0, help="seconds to finish running steps on SIGTERM")
    p.add_argument("--schema-dir", default=None, help="protocol/schemas for validation (default: located)")
    p.add_argument("--no-validate", action="store_true", help="skip JSON Schema validation of received bodies")
    p.add_argument("--curve-serverkey", default=os.environ.get("STEPBROKER_CURVE_SERVERKEY"))
    p.add_argument("--curve-publickey", default=os.environ.get("STEPBROKER_CURVE_PUBLICKEY"))
    p.add_argument("--curve-secretkey", default=os.environ.get("STEPBROKER_CURVE_SECRETKEY"))
    p.add_argument("--log-level", default=os.environ.get("STEPBROKER_LOG_LEVEL", "WARNING"))
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.state_dir:
        state_dir = Path(args.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = None
    else:
        tmp = tempfile.TemporaryDirectory(prefix="stepbroker-testpool-")
        state_dir = Path(tmp.name)
    pool_id = args.pool_id or default_pool_id("testpool")
    pool = HandlerPool(
        args.endpoint,
        capacity=args.capacity,
        encoding=args.encoding,
        pool_id=pool_id,
        handlers=build_handlers(args.handlers, state_dir),
        schema_dir=args.schema_dir,
        validate=False if args.no_validate else None,
        curve_serverkey=args.curve_serverkey,
        curve_publickey=args.curve_publickey,
        curve_secretkey=args.curve_secretkey,
        drain_timeout=args.drain_timeout,
    )

    def announce() -> None:
        # READY once the loop runs; WELCOMED after each WELCOME.
        while not pool.wait_started(0.2):
            if pool.wait_closed(0):
                return
        print(f"READY {pool.pool_id}", flush=True)
        while not pool.wait_closed(0):
            if pool.wait_welcome(0.2):
                print(f"WELCOMED {pool.pool_id} {pool.broker_id}", flush=True)
                while pool.welcomed and not pool.wait_closed(0.2):
                    pass

    threading.Thread(target=announce, name="testpool-announce", daemon=True).start()
    # pool.run() handles SIGTERM/SIGINT while it runs and restores these
    # afterwards: a second SIGTERM that arrives while exiting is ignored.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        pool.run()
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
