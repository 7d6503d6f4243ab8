"""The test pool as a child process, as the TypeScript end-to-end tests run it,
and CURVE against a CURVE-enabled fake broker."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from typing import IO, Iterator

import pytest
import zmq

from conftest import PKG_ROOT, SCHEMAS
from fakebroker import FakeBroker, step_item
from stepbroker_handlers import HandlerPool

WAIT = 10.0


class Child:
    def __init__(self, args: list, tmp_path) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(PKG_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env["STEPBROKER_SCHEMA_DIR"] = str(SCHEMAS)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stepbroker_handlers.testpool", *args, "--state-dir", str(tmp_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.stderr: list = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines.put), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr.append), daemon=True).start()

    @staticmethod
    def _pump(stream: IO[str], sink) -> None:
        for line in stream:
            sink(line.rstrip("\n"))

    def line(self) -> str:
        try:
            return self.lines.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(f"no output from the test pool; stderr: {self.stderr[-20:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(WAIT)
            raise AssertionError("the test pool did not exit on SIGTERM")


@pytest.fixture()
def broker(codec) -> Iterator[FakeBroker]:
    b = FakeBroker(codec)
    yield b
    b.close()


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_testpool_child_process(broker: FakeBroker, tmp_path, encoding: str) -> None:
    child = Child(["--endpoint", broker.endpoint, "--handlers", "echo,fail_then_succeed,permanent,sleep,noop,progress",
                   "--capacity", "2", "--pool-id", "py1", "--encoding", encoding], tmp_path)
    try:
        assert child.line() == "READY py1"
        ident, hello = broker.hello()
        assert ident == b"py1" and hello.body["capacity"] == 2 and hello.body["encoding"] == encoding
        assert hello.body["trace_context"] is True, "the SDK reads STEP trace context"
        broker.welcome(ident, encoding=encoding)
        assert child.line() == "WELCOMED py1 fake-broker"
        echo = step_item("echo", config={"x": 1}, inputs={"a": {"b": 2}})
        tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-5e2a1d9c07b3f4a1-01"
        echo["trace"] = {"traceparent": tp, "tracestate": "rojo=1"}
        flaky = step_item("fail_then_succeed", config={"failures": 1, "retry_after_ms": 10})
        ids = broker.step(ident, echo, flaky)
        got = broker.results(ids)
        assert got[ids[0]]["output"]["lang"] == "python"
        assert got[ids[0]]["output"]["inputs"] == {"a": {"b": 2}}
        assert got[ids[0]]["output"]["context"] == echo["context"]
        assert got[ids[0]]["output"]["config"] == {"x": 1}
        assert got[ids[0]]["output"]["trace"] == {
            "traceparent": tp, "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "span_id": "5e2a1d9c07b3f4a1"}
        assert got[ids[1]]["error"]["retry_after_ms"] == 10
        broker.ack(ident, *ids)
        # The retry of the same step succeeds (the count is kept per step_id).
        retry = {**flaky, "attempt_id": step_item("noop")["attempt_id"], "attempt": 2}
        perm = step_item("permanent")
        ids = broker.step(ident, retry, perm)
        got = broker.results(ids)
        assert got[ids[0]]["status"] == "complete" and got[ids[0]]["output"]["succeeded_on_run"] == 2
        assert got[ids[1]]["error"]["retryable"] is False
        broker.ack(ident, *ids)
        prog = step_item("progress", config={"ms": 60, "reports": 2})
        [pid] = broker.step(ident, prog)
        _, p = broker.recv("PROGRESS")
        assert p.body["progress"][0]["attempt_id"] == pid
        broker.results([pid])
        broker.ack(ident, pid)
        # SIGTERM while a step runs (its first PROGRESS shows it started):
        # DISCONNECT hands back nothing, the step finishes, its result is acked.
        mark = len(broker.log)
        [sid] = broker.step(ident, step_item("progress", config={"ms": 300, "reports": 3}))
        broker.recv("PROGRESS")
        child.proc.send_signal(signal.SIGTERM)
        _, d = broker.recv("DISCONNECT", skip=("HEARTBEAT", "RESULT", "PROGRESS"))
        assert "handed_back" not in d.body
        assert broker.results([sid], since=mark)[sid]["output"]["reports"] == 3
        broker.ack(ident, sid)
        assert child.proc.wait(WAIT) == 0
    finally:
        child.stop()


def test_testpool_exits_on_sigterm_without_broker(tmp_path) -> None:
    child = Child(["--endpoint", "tcp://127.0.0.1:1", "--handlers", "noop", "--pool-id", "py2"], tmp_path)
    assert child.line() == "READY py2"
    assert child.stop() == 0


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
def test_curve(codec) -> None:
    server_public, server_secret = zmq.curve_keypair()
    broker = FakeBroker(codec, curve_secretkey=server_secret)
    pool = HandlerPool(broker.endpoint, capacity=1, pool_id="py-curve", handlers={"noop": lambda s: None},
                       schema_dir=SCHEMAS, curve_serverkey=server_public.decode())
    pool.start()
    try:
        ident, hello = broker.hello()
        assert ident == b"py-curve"
        broker.welcome(ident)
        assert pool.wait_welcome(WAIT)
        [aid] = broker.step(ident, step_item("noop"))
        assert broker.results([aid])[aid]["output"] is None
        broker.ack(ident, aid)
    finally:
        pool.close(drain_timeout=0)
        broker.close()
