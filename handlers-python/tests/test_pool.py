"""Protocol-level behaviour of HandlerPool against a fake broker (a real ROUTER).

Every wait has a deadline; nothing asserts on timing.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any, Dict, Iterator, List

import pytest

from conftest import SCHEMAS
from fakebroker import FakeBroker, new_id, step_item
from stepbroker_handlers import HandlerPool, PermanentError, RetryAfter, RetryableError, Step
from stepbroker_handlers.protocol import frame

WAIT = 10.0


class Gate:
    """Lets a test hold handlers inside their run and see they started."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.steps: List[Step] = []


class PaymentDeclined(Exception):
    code = "payment_declined"


def nested(levels: int) -> Any:
    """A list ``levels`` deep holding 1."""
    v: Any = 1
    for _ in range(levels):
        v = [v]
    return v


def make_pool(endpoint: str, gate: Gate, **kw: Any) -> HandlerPool:
    pool = HandlerPool(endpoint, capacity=kw.pop("capacity", 4), encoding=kw.pop("encoding", "msgpack"),
                       pool_id=kw.pop("pool_id", f"py-test-{new_id()[:8]}"), schema_dir=SCHEMAS,
                       validate=kw.pop("validate", True),
                       drain_timeout=WAIT, reconnect_backoff=(0.05, 0.2), **kw)

    @pool.handler("echo")
    def echo(step: Step) -> Dict[str, Any]:
        return {"inputs": step.inputs, "context": step.context, "config": step.config, "attempt": step.attempt}

    @pool.handler("noop")
    def noop(step: Step) -> None:
        return None

    @pool.handler("retry_later")
    def retry_later(step: Step) -> None:
        raise RetryAfter(2, "gateway busy")

    @pool.handler("retryable")
    def retryable(step: Step) -> None:
        raise RetryableError("flaky", retry_after_ms=250, details={"try": step.attempt})

    @pool.handler("permanent")
    def permanent(step: Step) -> None:
        raise PermanentError("card stolen")

    @pool.handler("declined")
    def declined(step: Step) -> None:
        raise PaymentDeclined("insufficient funds")

    @pool.handler("boom")
    def boom(step: Step) -> None:
        raise KeyError("missing")

    @pool.handler("bad_output")
    def bad_output(step: Step) -> Any:
        return {"when": object()}

    @pool.handler("nul_output")
    def nul_output(step: Step) -> Any:
        return {"a": "x\u0000y"}

    @pool.handler("deep_output")
    def deep_output(step: Step) -> Any:
        return nested(60)

    @pool.handler("nul_raise")
    def nul_raise(step: Step) -> None:
        raise RetryableError("bad \u0000 byte \udc00", details={"raw": "a\u0000b"})

    @pool.handler("long_raise")
    def long_raise(step: Step) -> None:
        raise ValueError("a" * 8191 + "\u0000 past the cut")

    @pool.handler("fine_output")
    def fine_output(step: Step) -> Any:
        return {"emoji": "\U0001F600", "deep": nested(55)}

    @pool.handler("hold")
    def hold(step: Step) -> Dict[str, Any]:
        gate.steps.append(step)
        gate.started.set()
        if step.config.get("progress"):
            step.progress(0.5, "half way")
        while not gate.release.wait(0.01):
            if step.cancelled.is_set() and step.config.get("honour_cancel", True):
                raise RuntimeError(f"cancelled: {step.cancel_reason}")
        return {"held": True}

    return pool


@pytest.fixture()
def broker(codec) -> Iterator[FakeBroker]:
    b = FakeBroker(codec)
    yield b
    b.close()


@pytest.fixture()
def gate() -> Gate:
    return Gate()


@pytest.fixture()
def pool(broker: FakeBroker, gate: Gate) -> Iterator[HandlerPool]:
    p = make_pool(broker.endpoint, gate)
    p.start()
    yield p
    gate.release.set()
    p.close(drain_timeout=0)
    assert p.wait_closed(WAIT)


def welcomed(broker: FakeBroker, pool: HandlerPool, **terms: Any) -> bytes:
    ident, hello = broker.hello()
    broker.welcome(ident, **terms)
    assert pool.wait_welcome(WAIT)
    return ident


def test_hello_then_welcome(broker: FakeBroker, pool: HandlerPool) -> None:
    ident, msg = broker.hello()
    assert ident == pool.pool_id.encode()
    assert msg.encoding == "json"  # HELLO is always JSON
    b = msg.body
    assert b["pool_id"] == pool.pool_id
    assert set(b["handlers"]) >= {"echo", "noop", "hold"}
    assert b["capacity"] == 4
    assert b["encoding"] == "msgpack"
    assert b["sdk"]["language"] == "python"
    assert "running" not in b
    # A per-process session secret, the same in every HELLO (PROTOCOL.md, Ownership).
    assert re.fullmatch(r"[A-Za-z0-9_-]{22,128}", b["session"])
    assert not pool.welcomed
    broker.welcome(ident, encoding="json")
    assert pool.wait_welcome(WAIT)
    assert pool.broker_id == "fake-broker"


def test_msgpack_after_welcome(broker: FakeBroker, pool: HandlerPool) -> None:
    ident = welcomed(broker, pool, encoding="msgpack")
    [aid] = broker.step(ident, step_item("noop"))
    _, msg = broker.recv("RESULT")
    assert msg.encoding == "msgpack"
    assert msg.body["results"][0] == {**msg.body["results"][0], "attempt_id": aid, "status": "complete", "output": None}
    _, hb = broker.recv("HEARTBEAT", skip=())
    assert hb.encoding == "msgpack"


def test_multi_step_dispatch_and_outcomes(broker: FakeBroker, pool: HandlerPool) -> None:
    ident = welcomed(broker, pool)
    items = [
        step_item("echo", config={"k": 1}, inputs={"validate_order": {"total": 10}, "skipped": None}),
        step_item("noop"),
        step_item("retry_later"),
        step_item("retryable"),
        step_item("permanent"),
        step_item("declined"),
        step_item("boom"),
        step_item("bad_output"),
        step_item("not_served"),
    ]
    ids = broker.step(ident, *items)
    got = broker.results(ids)
    echo, noop, later, retryable, perm, declined, boom, bad, unknown = (got[i] for i in ids)
    assert echo["status"] == "complete"
    assert echo["output"] == {"inputs": {"validate_order": {"total": 10}, "skipped": None},
                              "context": {"order_id": 42}, "config": {"k": 1}, "attempt": 1}
    assert noop["status"] == "complete" and "output" in noop and noop["output"] is None
    assert later["error"]["retry_after_ms"] == 2000 and later["error"]["retryable"] is True
    assert later["error"]["type"] == "RetryAfter"
    assert retryable["error"] == {"type": "RetryableError", "message": "flaky", "retryable": True,
                                  "retry_after_ms": 250, "details": {"try": 1}}
    assert perm["error"]["type"] == "PermanentError" and perm["error"]["retryable"] is False
    assert declined["error"]["type"] == "payment_declined" and declined["error"]["retryable"] is True
    assert boom["error"]["type"] == "KeyError" and boom["error"]["retryable"] is True
    assert bad["error"]["type"] == "invalid_output" and bad["error"]["retryable"] is False
    assert unknown["error"]["type"] == "unknown_handler" and unknown["error"]["retryable"] is True
    for item in got.values():
        if item["attempt_id"] != unknown["attempt_id"]:
            assert item["duration_ms"] >= 0
    broker.ack(ident, *ids)


def test_output_the_broker_would_refuse_is_invalid_output_and_error_text_is_storable(
    broker: FakeBroker, pool: HandlerPool
) -> None:
    ident = welcomed(broker, pool)
    ids = broker.step(ident, *(step_item(h) for h in
                               ("nul_output", "deep_output", "nul_raise", "long_raise", "fine_output")))
    got = broker.results(ids)
    nul, deep, raised, long, fine = (got[i] for i in ids)
    for item in (nul, deep):
        assert item["status"] == "error" and "output" not in item
        assert item["error"]["type"] == "invalid_output" and item["error"]["retryable"] is False
    # The same words as the Node pool: where the first offending value is, and what to do.
    assert nul["error"]["message"] == (
        "the handler's output cannot be stored: at /a, a string holds U+0000 "
        "(PostgreSQL stores no U+0000 or unpaired surrogate; send bytes as base64)"
    )
    assert deep["error"]["message"] == (
        "the handler's output cannot be stored: at " + "/0" * 56 + ", nesting deeper than 56 levels"
    )
    # A message is only reported: U+FFFD stands in for what PostgreSQL cannot store; unstorable details go.
    assert raised["status"] == "error"
    assert raised["error"] == {"type": "RetryableError", "message": "bad \ufffd byte \ufffd", "retryable": True}
    assert long["error"]["message"] == "a" * 8191 + "\ufffd"
    assert fine["status"] == "complete" and fine["output"] == {"emoji": "\U0001F600", "deep": nested(55)}
    broker.ack(ident, *ids)


def test_results_batched_up_to_max_batch(broker: FakeBroker, pool: HandlerPool) -> None:
    ident = welcomed(broker, pool, max_batch=2)
    ids = broker.step(ident, *[step_item("noop") for _ in range(7)])
    seen: List[str] = []
    while set(seen) != set(ids):
        _, msg = broker.recv("RESULT")
        assert 1 <= len(msg.body["results"]) <= 2
        seen += [r["attempt_id"] for r in msg.body["results"]]
    broker.ack(ident, *ids)


def test_results_kept_until_ack_and_resent_after_rewelcome(broker: FakeBroker, pool: HandlerPool) -> None:
    ident = welcomed(broker, pool)
    [a1, a2] = broker.step(ident, step_item("noop"), step_item("echo"))
    broker.results([a1, a2])
    broker.ack(ident, a1)  # a2 stays unacknowledged
    # The broker "restarted" and does not know the pool: hello_required.
    broker.send(ident, "ERROR", {"code": "hello_required", "message": "send HELLO", "command": "RESULT"})
    _, hello = broker.recv("HELLO", skip=("HEARTBEAT", "RESULT"))
    assert hello.body["running"] == [a2]
    assert hello.encoding == "json"
    broker.welcome(ident, adopted=[a2])
    got = broker.results([a2])
    assert got[a2]["status"] == "complete"
    broker.ack(ident, a2, outcome="duplicate")
    # Once acknowledged it is forgotten: a new HELLO lists nothing running.
    broker.send(ident, "ERROR", {"code": "hello_required", "message": "send HELLO"})
    _, hello = broker.recv("HELLO", skip=("HEARTBEAT", "RESULT"))
    assert "running" not in hello.body


def test_broker_death_reconnects_with_running(broker: FakeBroker, gate: Gate, pool: HandlerPool) -> None:
    ident = welcomed(broker, pool, heartbeat_ms=50, liveness=3)
    [held, done] = broker.step(ident, step_item("hold"), step_item("noop"))
    broker.results([done])
    assert gate.started.wait(WAIT)
    # The broker dies: silence. A new one comes up on the same endpoint.
    broker.restart()
    broker.heartbeats = False
    ident2, hello = broker.hello()
    assert ident2 == ident
    assert sorted(hello.body["running"]) == sorted([held, done])
    broker.heartbeats = True
    broker.welcome(ident2, adopted=[held])
    assert broker.results([done])[done]["status"] == "complete"  # resent after WELCOME
    assert not gate.steps[0].cancelled.is_set()  # adopted: keeps running
    gate.release.set()
    assert broker.results([held])[held]["output"] == {"held": True}
    broker.ack(ident2, held, done)


def test_not_adopted_attempts_are_cancelled(broker: FakeBroker, gate: Gate, pool: HandlerPool) -> None:
    ident = welcomed(broker, pool)
    [held] = broker.step(ident, step_item("hold"))
    assert gate.started.wait(WAIT)
    broker.send(ident, "ERROR", {"code": "hello_required", "message": "send HELLO"})
    _, hello = broker.recv("HELLO")
    assert hello.body["running"] == [held]
    broker.welcome(ident, adopted=[])
    assert gate.steps[0].cancelled.wait(WAIT)
    assert gate.steps[0].cancel_reason == "lease_lost"
    got = broker.results([held])  # the result is still sent; a broker answers "stale"
    assert got[held]["status"] == "error"
    broker.ack(ident, held, outcome="stale")


def test_cancel_sets_the_event(broker: FakeBroker, gate: Gate, pool: HandlerPool) -> None:
    ident = welcomed(broker, pool)
    [aid] = broker.step(ident, step_item("hold"))
    assert gate.started.wait(WAIT)
    broker.send(ident, "CANCEL", {"cancels": [{"attempt_id": aid, "reason": "task_cancelled"}]})
    assert gate.steps[0].cancelled.wait(WAIT)
    assert gate.steps[0].cancel_reason == "task_cancelled"
    got = broker.results([aid])
    assert got[aid]["status"] == "error" and "task_cancelled" in got[aid]["error"]["message"]
    broker.ack(ident, aid, outcome="stale")


def _heartbeat_where(broker: FakeBroker, want: List[str]) -> Dict[str, Any]:
    """The first HEARTBEAT whose ``cancelling`` is ``want`` (other HEARTBEATs and RESULTs are skipped)."""
    deadline = time.monotonic() + WAIT
    while True:
        _, hb = broker.recv("HEARTBEAT", max(0.01, deadline - time.monotonic()), skip=("RESULT",))
        assert "cancelling" in hb.body, "every HEARTBEAT carries cancelling"
        if hb.body["cancelling"] == want:
            return hb.body


def test_cancelled_handler_that_keeps_running_is_listed_in_every_heartbeat(
    broker: FakeBroker, gate: Gate, pool: HandlerPool
) -> None:
    ident = welcomed(broker, pool)  # the fake's 200 ms heartbeat
    _heartbeat_where(broker, [])
    [aid] = broker.step(ident, step_item("hold", config={"honour_cancel": False}))
    assert gate.started.wait(WAIT)
    broker.send(ident, "CANCEL", {"cancels": [{"attempt_id": aid, "reason": "timeout"}]})
    assert gate.steps[0].cancelled.wait(WAIT)
    _heartbeat_where(broker, [aid])
    _heartbeat_where(broker, [aid])  # not only once: in every HEARTBEAT while it runs
    gate.release.set()
    _heartbeat_where(broker, [])
    got = broker.results([aid], since=0)  # the result is still sent; a broker answers "stale"
    assert got[aid]["status"] == "complete"
    broker.ack(ident, aid, outcome="stale")


def test_heartbeat_goes_out_at_once_when_a_cancelled_handler_returns(broker: FakeBroker, codec) -> None:
    release = {"a": threading.Event(), "b": threading.Event()}
    started = {"a": threading.Event(), "b": threading.Event()}
    steps: Dict[str, Step] = {}
    p = make_pool(broker.endpoint, Gate())

    def stubborn(step: Step) -> str:
        key = step.config["key"]
        steps[key] = step
        started[key].set()
        release[key].wait(WAIT)  # ignores its cancellation event
        return key

    p.add_handler("stubborn", stubborn)
    p.start()
    try:
        # A one-minute heartbeat: no periodic HEARTBEAT falls inside this test, so each one
        # received is the one sent because a cancelled handler returned.
        ident = welcomed(broker, p, heartbeat_ms=60_000)
        [a, b] = broker.step(ident, step_item("stubborn", config={"key": "a"}),
                             step_item("stubborn", config={"key": "b"}))
        assert started["a"].wait(WAIT) and started["b"].wait(WAIT)
        broker.send(ident, "CANCEL", {"cancels": [{"attempt_id": a, "reason": "task_cancelled"},
                                                  {"attempt_id": b, "reason": "timeout"}]})
        assert steps["a"].cancelled.wait(WAIT) and steps["b"].cancelled.wait(WAIT)
        mark = len(broker.log)
        release["b"].set()
        _, hb = broker.recv("HEARTBEAT", skip=("RESULT",))
        assert hb.body["cancelling"] == [a], "b returned; a still runs"
        release["a"].set()
        _, hb = broker.recv("HEARTBEAT", skip=("RESULT",))
        assert hb.body["cancelling"] == []
        got = broker.results([a, b], since=mark)
        assert got[a]["output"] == "a" and got[b]["output"] == "b"
        beats = [m for _, m in broker.log[mark:] if m.command == "HEARTBEAT"]
        assert len(beats) == 2, "one HEARTBEAT per returning handler, no periodic one"
        broker.ack(ident, a, b, outcome="stale")
    finally:
        for e in release.values():
            e.set()
        p.close(drain_timeout=0)
        assert p.wait_closed(WAIT)


def test_attempt_cancelled_before_it_started_is_never_listed(broker: FakeBroker, gate: Gate, codec) -> None:
    p = make_pool(broker.endpoint, gate, capacity=1)
    p.start()
    try:
        ident = welcomed(broker, p)
        [held, queued] = broker.step(ident, step_item("hold", config={"honour_cancel": False}), step_item("hold"))
        assert gate.started.wait(WAIT)
        broker.send(ident, "CANCEL", {"cancels": [{"attempt_id": queued, "reason": "timeout"}]})
        broker.send(ident, "CANCEL", {"cancels": [{"attempt_id": held, "reason": "timeout"}]})
        _heartbeat_where(broker, [held])  # the dropped one holds no worker, so it is not listed
        gate.release.set()
        _heartbeat_where(broker, [])
        got = broker.results([held], since=0)
        assert queued not in got and len(gate.steps) == 1
        broker.ack(ident, held, outcome="stale")
    finally:
        gate.release.set()
        p.close(drain_timeout=0)
        assert p.wait_closed(WAIT)


def test_progress(broker: FakeBroker, gate: Gate, pool: HandlerPool) -> None:
    ident = welcomed(broker, pool, encoding="msgpack")
    [aid] = broker.step(ident, step_item("hold", config={"progress": True}))
    _, msg = broker.recv("PROGRESS")
    assert msg.body == {"progress": [{"attempt_id": aid, "fraction": 0.5, "message": "half way"}]}
    gate.release.set()
    broker.results([aid])
    broker.ack(ident, aid)


def test_graceful_close_sends_disconnect(broker: FakeBroker, gate: Gate, codec) -> None:
    pool = make_pool(broker.endpoint, gate, capacity=1)
    pool.start()
    try:
        ident = welcomed(broker, pool)
        [running, queued] = broker.step(ident, step_item("hold"), step_item("noop"))
        assert gate.started.wait(WAIT)
        closer = threading.Thread(target=pool.close, kwargs={"drain_timeout": WAIT})
        closer.start()
        _, msg = broker.recv("DISCONNECT")
        assert msg.body["handed_back"] == [queued]
        assert not gate.steps[0].cancelled.is_set()  # running work may finish
        gate.release.set()
        got = broker.results([running])
        assert got[running]["output"] == {"held": True}
        assert not pool.wait_closed(0)  # still waiting for the ACK
        broker.ack(ident, running)
        closer.join(WAIT)
        assert pool.wait_closed(WAIT)
    finally:
        gate.release.set()
        pool.close(drain_timeout=0)


def test_close_before_any_broker(codec, gate: Gate) -> None:
    pool = make_pool("tcp://127.0.0.1:1", gate)  # nothing listens there
    pool.start()
    assert pool.wait_started(WAIT)
    pool.close()
    assert pool.wait_closed(WAIT)


def test_bad_messages_answered_with_error_never_to_an_error(broker: FakeBroker, pool: HandlerPool) -> None:
    ident = welcomed(broker, pool)
    bad_step = {"steps": [{**step_item("noop"), "attempt": 0}]}
    broker.send(ident, "STEP", bad_step)
    _, err = broker.recv("ERROR")
    assert err.body["code"] == "schema_violation"
    assert err.body["command"] == "STEP"
    assert err.body["instance_path"] == "/steps/0/attempt"
    # Garbage of every kind: each is answered, the pool keeps running.
    broker.send_raw(ident, [b"stepbroker/1", b"STEP"])
    assert broker.recv("ERROR")[1].body["code"] == "malformed_frame"
    broker.send_raw(ident, [b"stepbroker/9", b"STEP", b"{}"])
    assert broker.recv("ERROR")[1].body["code"] == "unsupported_version"
    broker.send_raw(ident, [b"stepbroker/1", b"SUBMIT", b"{}"])
    assert broker.recv("ERROR")[1].body["code"] == "unknown_command"
    broker.send_raw(ident, [b"stepbroker/1", b"ACK", b"\xc1"])
    assert broker.recv("ERROR")[1].body["code"] == "undecodable_body"
    # An invalid ERROR is not answered: the next ERROR we get is about the STEP after it.
    broker.send_raw(ident, frame("ERROR", {"code": "Not A Code", "message": "x"}))
    broker.send_raw(ident, [b"stepbroker/1", b"ERROR", b"garbage"])
    broker.send_raw(ident, [b"stepbroker/1", b"ERROR"])
    broker.send(ident, "STEP", {"steps": []})
    _, err = broker.recv("ERROR")
    assert err.body["command"] == "STEP" and err.body["instance_path"] == "/steps"
    # Still serving.
    [aid] = broker.step(ident, step_item("noop"))
    broker.results([aid])
    broker.ack(ident, aid)


def test_disconnect_from_broker_reconnects(broker: FakeBroker, pool: HandlerPool) -> None:
    ident = welcomed(broker, pool)
    [aid] = broker.step(ident, step_item("noop"))
    broker.results([aid])
    broker.send(ident, "DISCONNECT", {"code": "shutting_down", "reason": "restart"})
    _, hello = broker.recv("HELLO", skip=("HEARTBEAT", "RESULT"))
    assert hello.body["running"] == [aid]
    broker.welcome(ident)
    broker.results([aid])
    broker.ack(ident, aid)


def test_hello_resent_without_welcome(broker: FakeBroker, pool: HandlerPool) -> None:
    ident, first = broker.hello()
    ident2, again = broker.hello()  # after HEARTBEAT_INTERVAL_MS x LIVENESS (3 s)
    assert ident2 == ident and again.body == first.body
    broker.welcome(ident)
    assert pool.wait_welcome(WAIT)


def test_handlers_as_dict_and_validation(broker: FakeBroker) -> None:
    with pytest.raises(ValueError):
        HandlerPool(broker.endpoint, handlers={"bad name": lambda s: None})
    with pytest.raises(ValueError):
        HandlerPool(broker.endpoint, handlers={"trailing_newline\n": lambda s: None})
    with pytest.raises(ValueError):
        HandlerPool(broker.endpoint, capacity=0)
    p = HandlerPool(broker.endpoint, handlers={"a": lambda s: 1, "b.c:d-e": lambda s: 2}, schema_dir=SCHEMAS)
    assert p.handlers == ["a", "b.c:d-e"]
    assert p.validating


def test_without_schema_validation_and_over_ipc(codec, gate: Gate, tmp_path) -> None:
    broker = FakeBroker(codec, endpoint=f"ipc://{tmp_path}/broker.sock")
    pool = make_pool(broker.endpoint, gate, validate=False)
    assert not pool.validating
    pool.start()
    try:
        ident = welcomed(broker, pool, encoding="msgpack")
        # The fields the SDK relies on are checked even without jsonschema.
        broker.send(ident, "STEP", {"steps": [{"handler": "noop"}]})
        _, err = broker.recv("ERROR")
        assert err.body["code"] == "schema_violation" and err.body["instance_path"] == "/steps/0"
        [aid] = broker.step(ident, step_item("echo"))
        assert broker.results([aid])[aid]["output"]["context"] == {"order_id": 42}
        broker.ack(ident, aid)
    finally:
        gate.release.set()
        pool.close(drain_timeout=0)
        broker.close()


def test_integral_floats_are_integers(broker: FakeBroker, pool: HandlerPool) -> None:
    ident, _ = broker.hello()
    broker.send(ident, "WELCOME", {"broker_id": "b", "encoding": "msgpack", "heartbeat_ms": 200.0,
                                   "heartbeat_liveness": 10.0, "max_message_bytes": 4294967296.0,
                                   "max_batch": 64.0, "adopted": []})
    assert pool.wait_welcome(WAIT)
    item = {**step_item("echo"), "attempt": 2.0, "timeout_ms": 4294967296.0}
    [aid] = broker.step(ident, item)
    assert broker.results([aid])[aid]["output"]["attempt"] == 2
    broker.ack(ident, aid)


def test_step_trace_is_parsed_and_a_malformed_or_missing_one_is_none() -> None:
    base = step_item("h")
    assert Step(base).trace is None, "a broker that sent no trace"
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-5e2a1d9c07b3f4a1-00"
    t = Step({**base, "trace": {"traceparent": tp, "tracestate": "a=1"}}).trace
    assert t is not None
    assert (t.traceparent, t.tracestate, t.trace_id, t.span_id, t.sampled) == (
        tp, "a=1", "4bf92f3577b34da6a3ce929d0e0e4736", "5e2a1d9c07b3f4a1", False)
    for bad in ("00-" + "0" * 32 + "-5e2a1d9c07b3f4a1-01", tp.upper(), "junk", 7):
        assert Step({**base, "trace": {"traceparent": bad}}).trace is None, bad
