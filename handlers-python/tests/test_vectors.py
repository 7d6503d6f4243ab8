"""Every vector in protocol/vectors, through the SDK's own decode + validate,
in both encodings (PROTOCOL.md, "Test vectors")."""

from __future__ import annotations

import json
from typing import Any, List

import msgpack
import pytest

from conftest import SCHEMAS, VECTORS
from stepbroker_handlers.protocol import ALL_COMMANDS, JSON, MSGPACK, POOL_ERROR_TYPES, ProtocolError, frame


def _files() -> List[Any]:
    files = sorted(VECTORS.glob("*.json"))
    assert files, f"no vectors in {VECTORS}"
    return files


def _cases(kind: str, frames: bool) -> List[Any]:
    """Body vectors (frames=False) or raw-frame vectors (frames=True)."""
    out = []
    for path in _files():
        data = json.loads(path.read_text(encoding="utf-8"))
        for i, case in enumerate(data.get(kind, [])):
            if ("frames" in case) == frames:
                out.append(pytest.param(data.get("command"), case, id=f"{path.stem}:{i}:{case['name'][:50]}"))
    return out


def same(a: Any, b: Any) -> bool:
    """Equal values of the same JSON types (1 is not 1.0's type problem, True is not 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def raw_frames(spec: List[Any]) -> List[bytes]:
    return [bytes.fromhex(f["hex"]) if "hex" in f else f["text"].encode("utf-8") for f in spec]


def test_pool_error_types_are_the_reserved_ones_of_the_schema() -> None:
    """The error types an SDK writes are the protocol's, spelled as every SDK spells them."""
    reserved = json.loads((SCHEMAS / "common.json").read_text())["$defs"]["reserved_error_type"]["oneOf"]
    pool_types = {t["const"] for t in reserved if t["description"].startswith("(pool)")}
    assert pool_types == set(POOL_ERROR_TYPES)


def test_every_command_has_vectors() -> None:
    names = {json.loads(p.read_text())["command"] for p in _files() if p.name != "frames.json"}
    assert names == set(ALL_COMMANDS)


@pytest.mark.parametrize("command,case", _cases("valid", frames=False))
@pytest.mark.parametrize("encoding", [JSON, MSGPACK])
def test_valid_body(codec, command, case, encoding) -> None:
    frames = frame(command, case["body"], encoding)
    assert frames[0] == b"stepbroker/1" and frames[1] == command.encode()
    if encoding == MSGPACK:
        assert frames[2][0] in range(0x80, 0x90) or frames[2][0] in (0xDE, 0xDF)
    msg = codec.decode(frames)
    assert msg.command == command
    assert msg.encoding == encoding
    assert same(msg.body, case["body"])


@pytest.mark.parametrize("command,case", _cases("valid", frames=True))
def test_valid_frames(codec, command, case) -> None:
    msg = codec.decode(raw_frames(case["frames"]))
    assert msg.command == case["command"]
    assert same(msg.body, case["body"])


@pytest.mark.parametrize("command,case", _cases("invalid", frames=True))
def test_invalid_frames(codec, command, case) -> None:
    _expect_failure(codec, raw_frames(case["frames"]), case)


@pytest.mark.parametrize("command,case", _cases("invalid", frames=False))
@pytest.mark.parametrize("encoding", [JSON, MSGPACK])
def test_invalid_body(codec, command, case, encoding) -> None:
    _expect_failure(codec, frame(command, case["body"], encoding), case)


def _expect_failure(codec, frames: List[bytes], case: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        codec.decode(frames)
    err = info.value
    assert err.code == case["error_code"], err
    if case["error_code"] == "schema_violation":
        assert err.instance_path == case["instance_path"], err
        assert err.keyword == case["schema_keyword"], err
    body = err.to_body()
    codec.validators.validate("ERROR", body)  # the ERROR we would answer is itself valid


def test_msgpack_extension_and_binary_are_undecodable(codec) -> None:
    ext = msgpack.packb({"in_flight": msgpack.ExtType(1, b"x")})
    binv = msgpack.packb({"in_flight": b"\x01"}, use_bin_type=True)
    for body in (ext, binv):
        with pytest.raises(ProtocolError) as info:
            codec.decode([b"stepbroker/1", b"HEARTBEAT", body])
        assert info.value.code == "undecodable_body"


def test_json_nan_is_undecodable(codec) -> None:
    with pytest.raises(ProtocolError) as info:
        codec.decode([b"stepbroker/1", b"HEARTBEAT", b'{"in_flight": NaN}'])
    assert info.value.code == "undecodable_body"


def test_pool_rejects_client_commands(codec) -> None:
    from stepbroker_handlers.protocol import BROKER_TO_POOL

    with pytest.raises(ProtocolError) as info:
        codec.decode(frame("SUBMIT", {}), accept=BROKER_TO_POOL)
    assert info.value.code == "unknown_command"


def test_message_too_large(codec) -> None:
    with pytest.raises(ProtocolError) as info:
        codec.decode(frame("HEARTBEAT", {"in_flight": 1}), max_body_bytes=5)
    assert info.value.code == "message_too_large"


@pytest.mark.parametrize("sig,code", [(b"stepbroker/2", "unsupported_version"), (b"stepbroker/10", "unsupported_version"),
                                      (b"stepbroker/x", "malformed_frame"), (b"stepbroker/", "malformed_frame"),
                                      (b"stepbroker/1.0", "malformed_frame")])
def test_signature_versions(codec, sig, code) -> None:
    with pytest.raises(ProtocolError) as info:
        codec.decode([sig, b"HEARTBEAT", b"{}"])
    assert info.value.code == code
