/**
 * Framing and body codecs. A message is three frames:
 *   [signature "stepbroker/1", command, body]
 * (a ROUTER sees the sender's routing id in front of them). The body's first
 * byte tells its encoding — "{" is JSON, a MessagePack map marker is
 * MessagePack — so decoding needs no per-connection state.
 * Decoders return faults as values; nothing here throws on bad input.
 */
import { Packr, Unpackr } from "msgpackr";
import {
  COMMAND_SCHEMAS,
  Encodings,
  MAX_MESSAGE_BYTES,
  PROTOCOL_NAME,
  SIGNATURE,
  type CommandName,
  type Encoding,
} from "./constants";
import { fault, type ProtocolFault } from "./errors";
import { firstInvalidUtf8String } from "./msgpackStrings";
import { validateBody } from "./validate";
import type { BodyOf, Message } from "./bodies";

// Plain maps with string keys and no msgpackr extensions (records, structured
// clones): what every MessagePack library in every language reads.
// Properties whose value is undefined are left out, as JSON.stringify does.
// (msgpackr supports skipValues; its type definitions do not list it yet.)
const packr = new Packr({
  useRecords: false,
  moreTypes: false,
  variableMapSize: true,
  skipValues: [undefined],
} as ConstructorParameters<typeof Packr>[0]);
const unpackr = new Unpackr({ useRecords: false, mapsAsObjects: true, int64AsType: "number" });

const SIGNATURE_BUF = Buffer.from(SIGNATURE);
/** Another version of this protocol, as opposed to something else entirely. */
const VERSIONED_SIGNATURE = new RegExp(`^${PROTOCOL_NAME}/[0-9]+$`);
const utf8 = new TextDecoder("utf-8", { fatal: true });

/**
 * MessagePack can carry what JSON cannot (binary, extension types such as
 * timestamps, non-string keys); the protocol allows none of it, so both
 * encodings decode to the same plain values.
 */
function plainDataProblem(value: unknown, depth = 0): string | undefined {
  if (depth > 128) return "nesting deeper than 128 levels";
  if (value === null || typeof value === "string" || typeof value === "boolean") return undefined;
  if (typeof value === "number") return Number.isFinite(value) ? undefined : "a non-finite number";
  if (Array.isArray(value)) {
    for (const v of value) {
      const p = plainDataProblem(v, depth + 1);
      if (p) return p;
    }
    return undefined;
  }
  if (typeof value === "object" && Object.getPrototypeOf(value) === Object.prototype) {
    for (const v of Object.values(value)) {
      const p = plainDataProblem(v, depth + 1);
      if (p) return p;
    }
    return undefined;
  }
  return `a value of type ${value instanceof Uint8Array ? "binary" : value instanceof Date ? "timestamp extension" : typeof value}`;
}
const COMMAND_BUFS = new Map<string, Buffer>(Object.keys(COMMAND_SCHEMAS).map((c) => [c, Buffer.from(c)]));

export function encodeBody(body: unknown, encoding: Encoding): Buffer {
  if (encoding === Encodings.MSGPACK) return packr.pack(body);
  return Buffer.from(JSON.stringify(body));
}

export function encodeMessage<C extends CommandName>(
  command: C,
  body: BodyOf<C>,
  encoding: Encoding = "json",
): Buffer[] {
  return [SIGNATURE_BUF, COMMAND_BUFS.get(command)!, encodeBody(body, encoding)];
}

function isMsgpackMap(b: number): boolean {
  return (b >= 0x80 && b <= 0x8f) || b === 0xde || b === 0xdf;
}

/** Which encoding a body uses, from its first significant byte; undefined when neither. */
export function sniffEncoding(buf: Uint8Array): Encoding | undefined {
  for (let i = 0; i < buf.length; i++) {
    const b = buf[i]!;
    if (b === 0x20 || b === 0x09 || b === 0x0a || b === 0x0d) continue; // JSON whitespace
    if (b === 0x7b) return Encodings.JSON;
    if (i === 0 && isMsgpackMap(b)) return Encodings.MSGPACK;
    return undefined;
  }
  return undefined;
}

export type BodyDecoding =
  { ok: true; value: Record<string, unknown>; encoding: Encoding } | { ok: false; fault: ProtocolFault };

export function decodeBody(buf: Uint8Array, command?: string): BodyDecoding {
  const encoding = sniffEncoding(buf);
  const extra = command ? { command } : {};
  if (!encoding)
    return {
      ok: false,
      fault: fault("undecodable_body", "The body is not a JSON object or a MessagePack map", extra),
    };
  let value: unknown;
  try {
    value =
      encoding === Encodings.JSON
        ? // The fatal decoder: Buffer#toString would turn invalid UTF-8 into U+FFFD and accept it.
          JSON.parse(utf8.decode(buf))
        : unpackr.unpack(buf);
  } catch (e) {
    const why = e instanceof Error ? e.message : String(e);
    return {
      ok: false,
      fault: fault("undecodable_body", `The ${encoding} body does not parse (${why})`, extra),
    };
  }
  if (!value || typeof value !== "object" || Array.isArray(value)) {
    return { ok: false, fault: fault("undecodable_body", "The body is not an object", extra) };
  }
  if (encoding === Encodings.MSGPACK) {
    const badString = firstInvalidUtf8String(buf);
    const problem =
      badString >= 0 ? `a string that is not UTF-8 (at byte ${badString})` : plainDataProblem(value);
    if (problem)
      return {
        ok: false,
        fault: fault(
          "undecodable_body",
          `The MessagePack body holds ${problem}, which the protocol does not allow`,
          extra,
        ),
      };
  }
  return { ok: true, value: value as Record<string, unknown>, encoding };
}

export interface DecodeOptions {
  /** Refuse bodies larger than this many bytes (message_too_large). */
  maxBytes?: number;
  /** Which commands this receiver accepts; others are unknown_command. */
  accept?: ReadonlySet<string>;
}

export type Decoded =
  { ok: true; message: Message; encoding: Encoding } | { ok: false; fault: ProtocolFault };

/** Decodes the frames after the routing id: [signature, command, body]. */
export function decodeMessage(frames: readonly Uint8Array[], opts: DecodeOptions = {}): Decoded {
  if (frames.length !== 3) {
    return {
      ok: false,
      fault: fault("malformed_frame", `Expected 3 frames [signature, command, body], got ${frames.length}`),
    };
  }
  const [sig, cmd, body] = frames as [Uint8Array, Uint8Array, Uint8Array];
  if (!SIGNATURE_BUF.equals(sig)) {
    const text = Buffer.from(sig).toString("latin1").slice(0, 40);
    const code = VERSIONED_SIGNATURE.test(text) ? "unsupported_version" : "malformed_frame";
    return {
      ok: false,
      fault: fault(code, `Signature frame is ${JSON.stringify(text)}, expected "${SIGNATURE}"`),
    };
  }
  const command = Buffer.from(cmd).toString("latin1");
  if (!Object.hasOwn(COMMAND_SCHEMAS, command) || (opts.accept && !opts.accept.has(command))) {
    return {
      ok: false,
      fault: fault("unknown_command", `Command ${JSON.stringify(command.slice(0, 64))} is not accepted here`),
    };
  }
  const max = opts.maxBytes ?? MAX_MESSAGE_BYTES;
  if (body.byteLength > max) {
    return {
      ok: false,
      fault: fault(
        "message_too_large",
        `The ${command} body is ${body.byteLength} bytes; the limit is ${max}`,
        { command },
      ),
    };
  }
  const decoded = decodeBody(body, command);
  if (!decoded.ok) return decoded;
  const checked = validateBody(command as CommandName, decoded.value);
  if (!checked.ok) return checked;
  return { ok: true, message: { command, body: checked.body } as Message, encoding: decoded.encoding };
}
