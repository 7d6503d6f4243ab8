"""A test double that plays the broker with a real ROUTER socket.

It validates everything it receives against protocol/schemas (so every
message the SDK sends is checked), answers nothing by itself except
HEARTBEATs to keep the pool's liveness happy while a test waits, and gives
every wait a deadline so no test can hang.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

import zmq

from stepbroker_handlers.protocol import Codec, Message, frame

DEADLINE_S = 10.0


def new_id() -> str:
    return str(uuid.uuid4())


def step_item(handler: str, *, config: Optional[Dict[str, Any]] = None, inputs: Optional[Dict[str, Any]] = None,
              step_name: Optional[str] = None, attempt: int = 1, timeout_ms: int = 30000) -> Dict[str, Any]:
    return {
        "task_id": new_id(),
        "step_id": new_id(),
        "attempt_id": new_id(),
        "step_name": step_name or handler,
        "handler": handler,
        "attempt": attempt,
        "max_attempts": 3,
        "timeout_ms": timeout_ms,
        "template": {"namespace": "tests", "name": "t", "version": "1.0.0"},
        "context": {"order_id": 42},
        "config": config or {},
        "inputs": inputs or {},
    }


class FakeBroker:
    def __init__(self, codec: Codec, endpoint: str = "tcp://127.0.0.1:*", heartbeat_ms: int = 200,
                 curve_secretkey: Optional[bytes] = None) -> None:
        self.codec = codec
        self.curve_secretkey = curve_secretkey
        self.ctx = zmq.Context.instance()
        self.heartbeat_ms = heartbeat_ms
        self.sock = self._bind(endpoint)
        self.endpoint: str = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.peers: Dict[bytes, str] = {}  # identity -> encoding to send in
        self.log: List[Tuple[bytes, Message]] = []
        self._last_hb = 0.0
        self.heartbeats = True

    def _bind(self, endpoint: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.setsockopt(zmq.SNDTIMEO, 0)
        if self.curve_secretkey is not None:
            sock.curve_server = True
            sock.curve_secretkey = self.curve_secretkey
        sock.bind(endpoint)
        return sock

    def restart(self) -> None:
        """Close the ROUTER and bind a new one on the same endpoint (a broker restart)."""
        self.sock.close(linger=0)
        self.peers.clear()
        deadline = time.monotonic() + DEADLINE_S
        while True:
            try:
                self.sock = self._bind(self.endpoint)
                return
            except zmq.ZMQError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        self.sock.close(linger=0)

    # --- sending ---

    def send(self, ident: bytes, command: str, body: Dict[str, Any], encoding: Optional[str] = None) -> None:
        enc = encoding or self.peers.get(ident, "json")
        self.sock.send_multipart([ident, *frame(command, body, enc)])

    def send_raw(self, ident: bytes, frames: List[bytes]) -> None:
        self.sock.send_multipart([ident, *frames])

    def welcome(self, ident: bytes, *, encoding: str = "json", adopted: Optional[List[str]] = None,
                heartbeat_ms: Optional[int] = None, liveness: int = 10, max_batch: int = 64,
                max_message_bytes: int = 1024 * 1024) -> None:
        self.send(
            ident,
            "WELCOME",
            {
                "broker_id": "fake-broker",
                "encoding": encoding,
                "heartbeat_ms": heartbeat_ms or self.heartbeat_ms,
                "heartbeat_liveness": liveness,
                "max_message_bytes": max_message_bytes,
                "max_batch": max_batch,
                "adopted": adopted or [],
            },
            encoding="json",
        )
        self.peers[ident] = encoding

    def step(self, ident: bytes, *items: Dict[str, Any]) -> List[str]:
        self.send(ident, "STEP", {"steps": list(items)})
        return [i["attempt_id"] for i in items]

    def ack(self, ident: bytes, *attempt_ids: str, outcome: str = "stored") -> None:
        self.send(ident, "ACK", {"acks": [{"attempt_id": a, "outcome": outcome} for a in attempt_ids]})

    # --- receiving ---

    def recv(self, command: Optional[str] = None, timeout: float = DEADLINE_S,
             skip: Tuple[str, ...] = ("HEARTBEAT",)) -> Tuple[bytes, Message]:
        """The next message (of ``command`` if given; others in ``skip`` are dropped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {command or 'message'} within {timeout} s; got {[m.command for _, m in self.log[-10:]]}")
            self._heartbeat()
            if not self.sock.poll(min(int(left * 1000) + 1, self.heartbeat_ms // 2 or 1)):
                continue
            ident, *frames = self.sock.recv_multipart()
            msg = self.codec.decode(frames)  # raises if the SDK sent anything invalid
            self.log.append((ident, msg))
            if command is not None and msg.command == command:
                return ident, msg
            if command is None and msg.command not in skip:
                return ident, msg
            if command is not None and msg.command not in skip:
                raise AssertionError(f"expected {command}, got {msg.command}: {msg.body}")

    def hello(self, timeout: float = DEADLINE_S) -> Tuple[bytes, Message]:
        return self.recv("HELLO", timeout)

    def results(self, attempt_ids: List[str], timeout: float = DEADLINE_S,
                skip: Tuple[str, ...] = ("HEARTBEAT", "PROGRESS"), since: Optional[int] = None) -> Dict[str, Dict[str, Any]]:
        """Collect RESULT items until every id in attempt_ids has one.

        Only results received from now on count, or from ``self.log[since:]``.
        """
        want = set(attempt_ids)
        got: Dict[str, Dict[str, Any]] = {}
        if since is not None:
            for _, m in self.log[since:]:
                if m.command == "RESULT":
                    for item in m.body["results"]:
                        got[item["attempt_id"]] = item
        deadline = time.monotonic() + timeout
        while not want <= set(got):
            _, msg = self.recv("RESULT", max(0.01, deadline - time.monotonic()), skip=skip)
            for item in msg.body["results"]:
                got[item["attempt_id"]] = item
        return got

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if not self.heartbeats or now - self._last_hb < self.heartbeat_ms / 1000.0:
            return
        self._last_hb = now
        for ident in list(self.peers):
            try:
                self.send(ident, "HEARTBEAT", {})
            except zmq.ZMQError:
                pass
