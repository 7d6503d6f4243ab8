"""The stepbroker/1 wire protocol: constants, framing, codecs and validation.

Everything here follows ``protocol/PROTOCOL.md``; nothing depends on the
broker's implementation. The module has no global mutable state: a
:class:`Codec` holds the (optional) schema validators.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import msgpack

# --- constants (PROTOCOL.md: Framing, Heartbeats, Limits) -------------------

PROTOCOL_NAME = "stepbroker"
PROTOCOL_VERSION = 1
SIGNATURE = f"{PROTOCOL_NAME}/{PROTOCOL_VERSION}"
SIGNATURE_BYTES = SIGNATURE.encode("ascii")

HEARTBEAT_INTERVAL_MS = 1000
HEARTBEAT_LIVENESS = 3
MAX_MESSAGE_BYTES = 1024 * 1024
MAX_BATCH = 64
MAX_CONSECUTIVE_ERRORS = 10
#: A body nests at most this many levels (its own object is level 1), in both encodings.
MAX_DEPTH = 64
#: An output, usage, context or error details of its own nests at most this many levels (protocol/constants.ts).
MAX_VALUE_DEPTH = 56

JSON = "json"
MSGPACK = "msgpack"
ENCODINGS = (JSON, MSGPACK)

#: Every command, with the schema file that validates its body.
COMMAND_SCHEMAS: Dict[str, str] = {
    "HELLO": "hello.json",
    "WELCOME": "welcome.json",
    "STEP": "step.json",
    "RESULT": "result.json",
    "ACK": "ack.json",
    "PROGRESS": "progress.json",
    "CANCEL": "cancel.json",
    "HEARTBEAT": "heartbeat.json",
    "DISCONNECT": "disconnect.json",
    "ERROR": "error.json",
    "SUBMIT": "submit.json",
    "STATUS": "status.json",
    "WAIT": "wait.json",
    "CANCEL_TASK": "cancel_task.json",
    "POOLS": "pools.json",
    "HISTORY": "history.json",
    "REPLY": "reply.json",
}
ALL_COMMANDS: FrozenSet[str] = frozenset(COMMAND_SCHEMAS)
#: What a pool accepts from the broker.
BROKER_TO_POOL: FrozenSet[str] = frozenset(
    {"WELCOME", "STEP", "ACK", "CANCEL", "HEARTBEAT", "DISCONNECT", "ERROR"}
)

ERROR_CODES: FrozenSet[str] = frozenset(
    {
        "malformed_frame",
        "unsupported_version",
        "unknown_command",
        "undecodable_body",
        "schema_violation",
        "message_too_large",
        "unstorable_value",
        "too_deep",
        "hello_required",
        "hello_rejected",
        "identity_mismatch",
        "session_mismatch",
        "not_your_attempt",
        "unknown_attempt",
        "stale_attempt",
        "unknown_task",
        "unknown_template",
        "invalid_request",
        "forbidden",
        "too_many_errors",
        "over_budget",
        "reply_too_large",
        "shutting_down",
        "internal_error",
    }
)

# Error types the protocol reserves for step_error.type (protocol/schemas/common.json,
# $defs/reserved_error_type): every SDK writes these same strings for these cases.
UNKNOWN_HANDLER = "unknown_handler"
OUTPUT_TOO_LARGE = "output_too_large"
INVALID_OUTPUT = "invalid_output"
INVALID_RESULT = "invalid_result"
POOL_ERROR_TYPES = (UNKNOWN_HANDLER, OUTPUT_TOO_LARGE, INVALID_OUTPUT, INVALID_RESULT)

CANCEL_REASONS = ("task_cancelled", "timeout", "lease_lost", "shutdown")
ACK_OUTCOMES = ("stored", "duplicate", "stale", "unknown")

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,127}$")
ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

_JSON_WS = b" \t\r\n"
_SIG_PREFIX = (PROTOCOL_NAME + "/").encode("ascii")


class ProtocolError(Exception):
    """A received message that cannot be handled; maps to an ERROR body."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        command: Optional[str] = None,
        instance_path: Optional[str] = None,
        schema_path: Optional[str] = None,
        keyword: Optional[str] = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.command = command
        self.instance_path = instance_path
        self.schema_path = schema_path
        self.keyword = keyword

    def to_body(self) -> Dict[str, Any]:
        """The ERROR body that answers the offending message."""
        body: Dict[str, Any] = {"code": self.code, "message": self.message[:8192]}
        if self.command is not None and len(self.command) <= 64:
            body["command"] = self.command
        if self.schema_path is not None:
            body["schema_path"] = self.schema_path[:1024]
        if self.instance_path is not None:
            body["instance_path"] = self.instance_path[:1024]
        return body


# --- body codecs ------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"MessagePack extension type {code} is not allowed")


def encode_body(body: Mapping[str, Any], encoding: str = JSON) -> bytes:
    """Encode one body object as JSON (compact UTF-8) or as a MessagePack map."""
    if encoding == MSGPACK:
        return msgpack.packb(body, use_bin_type=True, strict_types=False)  # type: ignore[no-any-return]
    if encoding == JSON:
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    raise ValueError(f"unknown encoding {encoding!r}")


def body_encoding(data: bytes) -> Optional[str]:
    """The encoding a body's first byte announces (PROTOCOL.md: Encodings), or None."""
    for b in data:
        if b in _JSON_WS:
            continue
        if b == 0x7B:
            return JSON
        break
    if data and (0x80 <= data[0] <= 0x8F or data[0] in (0xDE, 0xDF)):
        return MSGPACK
    return None


_JSON_SPECIAL = re.compile(rb'["\\\[\]{}]')
#: What PostgreSQL's jsonb cannot store. json.loads pairs surrogate escapes, so any surrogate left is unpaired.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _json_too_deep_at(data: bytes) -> int:
    """Offset of the bracket that opens level MAX_DEPTH + 1 outside strings, or -1 (checked before parsing)."""
    depth = 0
    in_str = False
    skip_to = -1
    for m in _JSON_SPECIAL.finditer(data):
        i = m.start()
        if i < skip_to:
            continue  # the character after a backslash
        c = data[i]
        if in_str:
            if c == 0x5C:
                skip_to = i + 2
            elif c == 0x22:
                in_str = False
        elif c == 0x22:
            in_str = True
        elif c in (0x7B, 0x5B):
            depth += 1
            if depth > MAX_DEPTH:
                return i
        elif c in (0x7D, 0x5D):
            depth -= 1
    return -1


def _storable_pointer(path: Tuple[str, ...]) -> str:
    """JSON Pointer text for a path, with U+0000 and lone surrogates written as \\uXXXX so it stays storable."""
    return "".join(
        "/" + _UNSTORABLE.sub(lambda m: "\\u%04x" % ord(m.group()), k.replace("~", "~0").replace("/", "~1"))
        for k in path
    )


def _unstorable(s: str) -> Optional[str]:
    m = _UNSTORABLE.search(s)
    if m is None:
        return None
    return "U+0000" if m.group() == "\x00" else "an unpaired surrogate"


def storable_text(s: str) -> str:
    """Text jsonb can store: U+0000 and lone surrogates become U+FFFD.

    For text a pool only reports (an exception's message), where losing those
    characters beats losing the whole result; the same as the Node SDK's storableText.
    """
    return _UNSTORABLE.sub("\ufffd", s)


def value_problem(value: Any, max_depth: int = MAX_VALUE_DEPTH) -> Optional[Tuple[str, str, str]]:
    """``(code, what, pointer)`` for the first value in a parsed JSON value that the broker refuses, or None.

    The same walk, order and wording as the Node SDK's valueProblem, so every pool says the same thing.
    """
    path: List[str] = []

    def walk(v: Any, depth: int) -> Optional[Tuple[str, str]]:
        if isinstance(v, str):
            bad = _unstorable(v)
            return ("unstorable_value", f"a string holds {bad}") if bad else None
        if not isinstance(v, (dict, list)):
            return None
        if depth > max_depth:
            return ("too_deep", f"nesting deeper than {max_depth} levels")
        if isinstance(v, list):
            for i, x in enumerate(v):
                p = walk(x, depth + 1)
                if p:
                    path.append(str(i))
                    return p
            return None
        for k, x in v.items():
            bad = _unstorable(k)
            if bad:
                path.append(k)
                return ("unstorable_value", f"an object key holds {bad}")
            p = walk(x, depth + 1)
            if p:
                path.append(k)
                return p
        return None

    found = walk(value, 1)
    if found is None:
        return None
    return found[0], found[1], _storable_pointer(tuple(reversed(path)))


def _check_value(value: Any, path: Tuple[str, ...], depth: int) -> None:
    """Only JSON-like values (no binary, no extensions) that jsonb can store, at most MAX_DEPTH deep."""
    if isinstance(value, str):
        bad = _unstorable(value)
        if bad:
            where = _storable_pointer(path)
            raise ProtocolError("unstorable_value", f"{where}: a string holds {bad}", instance_path=where)
    elif isinstance(value, (dict, list)):
        if depth > MAX_DEPTH:
            raise ProtocolError("too_deep", f"The body nests deeper than {MAX_DEPTH} levels.", instance_path="")
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    raise ValueError(f"map key at {_storable_pointer(path) or '/'} is not a string")
                bad = _unstorable(k)
                if bad:
                    where = _storable_pointer(path + (k,))
                    raise ProtocolError("unstorable_value", f"{where}: an object key holds {bad}", instance_path=where)
                _check_value(v, path + (k,), depth + 1)
        else:
            for i, v in enumerate(value):
                _check_value(v, path + (str(i),), depth + 1)
    elif isinstance(value, (bytes, bytearray)):
        raise ValueError(f"binary value at {_storable_pointer(path) or '/'} is not allowed")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"non-finite number at {_storable_pointer(path) or '/'} is not allowed")


def decode_body(data: bytes) -> Tuple[Dict[str, Any], str]:
    """Decode a body by its first byte. Raises ProtocolError (undecodable_body, too_deep, unstorable_value)."""
    enc = body_encoding(data)
    if enc == JSON:
        at = _json_too_deep_at(data)
        if at >= 0:
            raise ProtocolError(
                "too_deep",
                f"The JSON body nests deeper than {MAX_DEPTH} levels (level {MAX_DEPTH + 1} opens at byte {at}).",
                instance_path="",
            )
    try:
        if enc == JSON:
            if data.startswith(b"\xef\xbb\xbf"):
                raise ValueError("byte-order mark")
            value = json.loads(data.decode("utf-8", errors="strict"), parse_constant=_reject_constant)
        elif enc == MSGPACK:
            # The C unpacker bounds its own nesting (StackError); the walk below applies MAX_DEPTH.
            value = msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_no_ext)
        else:
            raise ValueError("the first byte is neither '{' nor a MessagePack map")
        if isinstance(value, dict):
            _check_value(value, (), 1)
    except ProtocolError:
        raise
    except msgpack.exceptions.StackError:
        raise ProtocolError("too_deep", f"The MessagePack body nests deeper than {MAX_DEPTH} levels.", instance_path="")
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the same protocol error
        raise ProtocolError("undecodable_body", f"The body is neither a JSON object nor a MessagePack map: {exc}")
    if not isinstance(value, dict):
        raise ProtocolError("undecodable_body", "The body is not an object/map.")
    return value, enc  # type: ignore[return-value]


# --- framing ------------------------------------------------------------------


def frame(command: str, body: Mapping[str, Any], encoding: str = JSON) -> List[bytes]:
    """The three frames [signature, command, body] of one message."""
    return [SIGNATURE_BYTES, command.encode("ascii"), encode_body(body, encoding)]


class Message:
    """A decoded, validated message."""

    __slots__ = ("command", "body", "encoding", "size")

    def __init__(self, command: str, body: Dict[str, Any], encoding: str, size: int) -> None:
        self.command = command
        self.body = body
        self.encoding = encoding
        self.size = size

    def __repr__(self) -> str:
        return f"Message({self.command}, {self.encoding}, {self.body!r})"


def parse_frames(
    frames: Sequence[bytes],
    *,
    accept: Iterable[str] = ALL_COMMANDS,
    max_body_bytes: Optional[int] = None,
) -> Tuple[str, bytes]:
    """Check the frames and return (command, raw body). Raises ProtocolError.

    Order of checks: frame count, signature, command, size.
    """
    if len(frames) != 3:
        raise ProtocolError("malformed_frame", f"Expected 3 frames [signature, command, body], got {len(frames)}.")
    sig, cmd_raw, body = (bytes(f) for f in frames)
    if sig != SIGNATURE_BYTES:
        rest = sig[len(_SIG_PREFIX):]
        if sig.startswith(_SIG_PREFIX) and rest.isdigit() and rest.isascii():
            raise ProtocolError("unsupported_version", f"This peer speaks {SIGNATURE}, not {sig[:64]!r}.")
        raise ProtocolError("malformed_frame", f"The first frame is not the signature {SIGNATURE!r}.")
    try:
        command = cmd_raw.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("unknown_command", "The command frame is not ASCII.")
    if command not in accept:
        raise ProtocolError("unknown_command", f"Command {command[:64]!r} is not accepted here.", command=command[:64])
    if max_body_bytes is not None and len(body) > max_body_bytes:
        raise ProtocolError(
            "message_too_large", f"The body is {len(body)} bytes, over the limit of {max_body_bytes}.", command=command
        )
    return command, body


# --- schema validation --------------------------------------------------------


def find_schema_dir(explicit: Union[str, os.PathLike, None] = None) -> Optional[Path]:
    """Locate ``protocol/schemas``.

    Order: the explicit argument, ``$STEPBROKER_SCHEMA_DIR``, then
    ``protocol/schemas`` in this file's ancestors (a source checkout, or a venv
    inside the repository) and in the current directory's ancestors.
    """
    if explicit is not None:
        p = Path(explicit)
        return p if (p / "common.json").is_file() else None
    env = os.environ.get("STEPBROKER_SCHEMA_DIR")
    if env:
        p = Path(env)
        return p if (p / "common.json").is_file() else None
    for start in (Path(__file__).resolve().parent, Path.cwd().resolve()):
        for d in (start, *start.parents):
            cand = d / "protocol" / "schemas"
            if (cand / "common.json").is_file() and (cand / "hello.json").is_file():
                return cand
    return None


# Ajv (allErrors: false) stops at the first failing keyword, checking an
# object's keywords in its own order; our vectors name Ajv's keyword. These
# ranks approximate that order so that the error reported first is the same.
_KEYWORD_RANK = {
    "$ref": 0,
    "type": 1,
    "const": 2,
    "enum": 2,
    "false schema": 3,
    "maximum": 4, "minimum": 4, "exclusiveMaximum": 4, "exclusiveMinimum": 4, "multipleOf": 4,
    "maxLength": 5, "minLength": 5, "pattern": 5, "format": 5,
    "maxItems": 6, "minItems": 6, "uniqueItems": 6, "contains": 6,
    "maxProperties": 7, "minProperties": 7, "required": 7, "dependentRequired": 7,
    "propertyNames": 8, "additionalProperties": 8,
    "properties": 9, "patternProperties": 9, "items": 9, "prefixItems": 9,
    "if": 10, "then": 10, "else": 10, "allOf": 10, "anyOf": 10, "oneOf": 10, "not": 10,
}


@functools.lru_cache(maxsize=256)
def ecma_regex(pattern: str) -> "re.Pattern[str]":
    """Compile a JSON Schema (ECMA-262) pattern with ECMA's meaning of `$`.

    Unescaped `$` outside a character class becomes `\\Z`; `\\d`, `\\w`, `\\s`
    keep ASCII meanings as with ECMA's `u` flag (re.ASCII).
    """
    out, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
        elif c == "]" and in_class:
            in_class = False
        elif c == "$" and not in_class:
            c = r"\Z"
        out.append(c)
        i += 1
    return re.compile("".join(out), re.ASCII)


def _pointer(parts: Iterable[Any]) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


class SchemaValidators:
    """Draft 2020-12 validators for every command, built once from a schema dir."""

    def __init__(self, schema_dir: Union[str, os.PathLike]) -> None:
        from jsonschema import Draft202012Validator, ValidationError, validators  # optional dependency
        from referencing import Registry, Resource

        def properties(validator: Any, props: Any, instance: Any, schema: Any) -> Any:
            # jsonschema reports a `false` property schema without its path;
            # report it at the property, under Ajv's name "false schema".
            if not validator.is_type(instance, "object"):
                return
            for prop, sub in props.items():
                if prop not in instance:
                    continue
                if sub is False:
                    err = ValidationError(
                        f"property {prop!r} is not allowed here",
                        validator="false schema",
                        validator_value=False,
                        instance=instance[prop],
                        schema=False,
                    )
                    err.path.appendleft(prop)
                    err.schema_path.appendleft(prop)
                    yield err
                else:
                    yield from validator.descend(instance[prop], sub, path=prop, schema_path=prop)

        def pattern(validator: Any, patrn: str, instance: Any, schema: Any) -> Any:
            # ECMA-262 regexes (what JSON Schema specifies): `$` matches only
            # at the very end, where Python's also matches before a final "\n".
            if validator.is_type(instance, "string") and not ecma_regex(patrn).search(instance):
                yield ValidationError(f"{instance!r} does not match {patrn!r}")

        Validator = validators.extend(Draft202012Validator, {"properties": properties, "pattern": pattern})

        self.schema_dir = Path(schema_dir)
        resources = []
        schemas: Dict[str, Any] = {}
        for path in sorted(self.schema_dir.glob("*.json")):
            with open(path, encoding="utf-8") as fh:
                schema = json.load(fh)
            schemas[path.name] = schema
            resources.append((schema["$id"], Resource.from_contents(schema)))
        registry = Registry().with_resources(resources)
        self._validators = {}
        for command, file in COMMAND_SCHEMAS.items():
            if file in schemas:
                self._validators[command] = Validator(schemas[file], registry=registry)

    def has(self, command: str) -> bool:
        return command in self._validators

    def validate(self, command: str, body: Any) -> None:
        """Raise ProtocolError(schema_violation) naming the first failing keyword."""
        v = self._validators.get(command)
        if v is None:
            return
        errors = list(v.iter_errors(body))
        if not errors:
            return
        err = min(errors, key=self._order)
        keyword = self._keyword(err)
        instance_path = _pointer(err.absolute_path)
        schema_path = "#" + _pointer(err.absolute_schema_path)
        raise ProtocolError(
            "schema_violation",
            f"{command} body{instance_path or ''} fails '{keyword}': {err.message[:500]}",
            command=command,
            instance_path=instance_path,
            schema_path=schema_path,
            keyword=keyword,
        )

    @staticmethod
    def _keyword(err: Any) -> str:
        if err.validator is None or err.schema is False:
            return "false schema"
        return str(err.validator)

    @classmethod
    def _order(cls, err: Any) -> Tuple[int, int, int]:
        # Shallow instance paths first (Ajv reports an object's own keywords
        # before descending), then Ajv's keyword order, then document order.
        return (len(err.absolute_path), _KEYWORD_RANK.get(cls._keyword(err), 11), 0)


class Codec:
    """Decode + validate received frames, encode outgoing ones.

    ``validators`` is optional: without it only the fields the SDK relies on
    are checked (see :func:`check_fields`).
    """

    def __init__(self, validators: Optional[SchemaValidators] = None) -> None:
        self.validators = validators

    @classmethod
    def create(cls, schema_dir: Union[str, os.PathLike, None] = None, validate: Optional[bool] = None) -> "Codec":
        """Validation on when ``validate`` is True, or when None and jsonschema + schemas are available."""
        if validate is False:
            return cls(None)
        d = find_schema_dir(schema_dir)
        if d is None:
            if validate:
                raise RuntimeError("schema validation requested but protocol/schemas was not found (set schema_dir)")
            return cls(None)
        try:
            return cls(SchemaValidators(d))
        except ImportError:
            if validate:
                raise
            return cls(None)

    @property
    def validating(self) -> bool:
        return self.validators is not None

    def decode(
        self,
        frames: Sequence[bytes],
        *,
        accept: Iterable[str] = ALL_COMMANDS,
        max_body_bytes: Optional[int] = None,
    ) -> Message:
        command, raw = parse_frames(frames, accept=accept, max_body_bytes=max_body_bytes)
        try:
            body, enc = decode_body(raw)
        except ProtocolError as e:
            e.command = command
            raise
        if self.validators is not None:
            self.validators.validate(command, body)
        check_fields(command, body)
        return Message(command, body, enc, len(raw))

    @staticmethod
    def encode(command: str, body: Mapping[str, Any], encoding: str = JSON) -> List[bytes]:
        return frame(command, body, encoding)


# --- the checks the SDK relies on, with or without jsonschema -----------------


def _violation(command: str, path: str, keyword: str, msg: str) -> ProtocolError:
    return ProtocolError(
        "schema_violation", f"{command} body{path}: {msg}", command=command, instance_path=path, keyword=keyword
    )


def _items(command: str, body: Mapping[str, Any], key: str) -> List[Dict[str, Any]]:
    items = body.get(key)
    if not isinstance(items, list):
        raise _violation(command, "" if key not in body else f"/{key}", "required" if key not in body else "type",
                         f"'{key}' must be an array")
    if not items:
        raise _violation(command, f"/{key}", "minItems", f"'{key}' must not be empty")
    for i, it in enumerate(items):
        if not isinstance(it, dict):
            raise _violation(command, f"/{key}/{i}", "type", "must be an object")
        aid = it.get("attempt_id")
        if not isinstance(aid, str):
            raise _violation(command, f"/{key}/{i}", "required", "attempt_id is required")
    return items


def as_int(v: Any) -> Optional[int]:
    """An integer, or an integral float (MessagePack encoders may send 2^32+ as float64); else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None


def check_fields(command: str, body: Mapping[str, Any]) -> None:
    """Minimal structural checks of the fields this SDK reads (always on)."""
    if command == "WELCOME":
        for k in ("heartbeat_ms", "heartbeat_liveness", "max_message_bytes", "max_batch"):
            v = as_int(body.get(k))
            if v is None or v < 1:
                raise _violation(command, f"/{k}" if k in body else "", "type" if k in body else "required",
                                 f"'{k}' must be a positive integer")
        if body.get("encoding") not in ENCODINGS:
            raise _violation(command, "/encoding", "enum", "encoding must be json or msgpack")
        adopted = body.get("adopted", [])
        if not isinstance(adopted, list) or not all(isinstance(a, str) for a in adopted):
            raise _violation(command, "/adopted", "type", "adopted must be an array of ids")
    elif command == "STEP":
        for i, s in enumerate(_items(command, body, "steps")):
            for k in ("handler", "task_id", "step_id", "step_name"):
                if not isinstance(s.get(k), str):
                    raise _violation(command, f"/steps/{i}", "required", f"'{k}' must be a string")
            for k in ("context", "config", "inputs"):
                if k in s and not isinstance(s[k], dict):
                    raise _violation(command, f"/steps/{i}/{k}", "type", f"'{k}' must be an object")
    elif command == "ACK":
        _items(command, body, "acks")
    elif command == "CANCEL":
        _items(command, body, "cancels")
    elif command == "RESULT":
        _items(command, body, "results")
    elif command == "PROGRESS":
        _items(command, body, "progress")
    elif command == "ERROR":
        if not isinstance(body.get("code"), str):
            raise _violation(command, "", "required", "'code' must be a string")
