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
  ID_PATTERN,
  MAX_DEPTH,
  MAX_MESSAGE_BYTES,
  PROTOCOL_NAME,
  SIGNATURE,
  type CommandName,
  type Encoding,
} from "./constants";
import { fault, type ProtocolFault } from "./errors";
import { scanMsgpack } from "./msgpackStrings";
import { pointer, valueProblem } from "./storableValues";
import { validateBody } from "./validateBody";
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

/** What one pass over a JSON text's bytes tells before it is parsed. */
export interface JsonScan {
  /** The offset of the first `{` or `[` that opens level `maxDepth + 1`, or -1. */
  tooDeepAt: number;
  /**
   * Whether a number outside strings has an exponent or a run of more than
   * 300 digits: only such a number can parse to Infinity (`1e999`), which
   * jsonb cannot store. False proves every number parses finite.
   */
  mayOverflow: boolean;
}

/** Digits in a row past which a JSON number may be too large for a double (10^308 has 309). */
const LONG_DIGIT_RUN = 300;

/**
 * One pass over a JSON text's bytes: how deep it nests, stopping at the first
 * `{` or `[` that opens level `maxDepth + 1`, and whether any number could
 * overflow. Brackets inside strings do not count; a string is skipped with
 * indexOf to its closing quote (a quote after an odd run of backslashes is
 * escaped). Stops at the first excess, so a body nested 100,000 deep costs
 * maxDepth + 1 bytes of scanning and no parse at all.
 */
export function scanJson(buf: Uint8Array, maxDepth: number): JsonScan {
  let depth = 0;
  let digits = 0;
  let mayOverflow = false;
  const n = buf.length;
  for (let i = 0; i < n; i++) {
    const b = buf[i]!;
    if (b >= 0x30 && b <= 0x39) {
      if (++digits > LONG_DIGIT_RUN) mayOverflow = true;
      continue;
    }
    // an exponent follows a digit; the `e` of true and false follows a letter
    if ((b === 0x65 || b === 0x45) && digits > 0) mayOverflow = true;
    digits = 0;
    if (b === 0x22) {
      let j = i;
      for (;;) {
        j = buf.indexOf(0x22, j + 1);
        if (j < 0) return { tooDeepAt: -1, mayOverflow }; // unterminated: JSON.parse says so
        let k = j - 1;
        while (buf[k] === 0x5c) k--;
        if ((j - 1 - k) % 2 === 0) break;
      }
      i = j;
    } else if (b === 0x7b || b === 0x5b) {
      if (++depth > maxDepth) return { tooDeepAt: i, mayOverflow };
    } else if (b === 0x7d || b === 0x5d) depth--;
  }
  return { tooDeepAt: -1, mayOverflow };
}

/** The bytes of a JSON `\u` escape: the only way a JSON text can hold U+0000 or a lone surrogate. */
const UNICODE_ESCAPE = Buffer.from("\\u");

function tooDeep(encoding: Encoding, at: number, extra: { command?: string }): BodyDecoding {
  return {
    ok: false,
    fault: fault(
      "too_deep",
      `The ${encoding} body nests deeper than ${MAX_DEPTH} levels (level ${MAX_DEPTH + 1} opens at byte ${at})`,
      { ...extra, instancePath: "" },
    ),
  };
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
  // Depth first, over the bytes: parsers recurse, and deep input costs them stack, memory and time.
  // Whether the parsed value needs the walk for values jsonb cannot store (see below).
  let mayBeUnstorable = true;
  if (encoding === Encodings.JSON) {
    const scan = scanJson(buf, MAX_DEPTH);
    if (scan.tooDeepAt >= 0) return tooDeep(encoding, scan.tooDeepAt, extra);
    mayBeUnstorable =
      scan.mayOverflow || Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength).includes(UNICODE_ESCAPE);
  } else {
    const scan = scanMsgpack(buf, MAX_DEPTH);
    if (scan?.problem === "too_deep") return tooDeep(encoding, scan.at, extra);
    if (scan)
      return {
        ok: false,
        fault: fault(
          "undecodable_body",
          `The MessagePack body holds a string that is not UTF-8 (at byte ${scan.at}), which the protocol does not allow`,
          extra,
        ),
      };
  }
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
  // Parsed JSON is plain objects, arrays, strings, booleans, null and numbers, nested no deeper
  // than the scan allowed. Raw U+0000 is not JSON and a raw surrogate is not UTF-8 (the fatal
  // decoder refused it), so a string can hold either only through a \u escape, and a number can be
  // Infinity only with an exponent or hundreds of digits: without those bytes there is nothing
  // for the walk to find, and most bodies (ids, names, small numbers) have none.
  const problem = mayBeUnstorable ? valueProblem(value, MAX_DEPTH) : undefined;
  if (problem) {
    const where = pointer(problem.path);
    const attemptId = resultAttemptId(value, problem.path);
    // A client matches answers by request_id: a body refused after parsing can still name it.
    const requestId = (value as { request_id?: unknown }).request_id;
    const echo =
      typeof requestId === "string" &&
      problem.path[0] !== "request_id" &&
      requestId.length > 0 &&
      [...requestId].length <= 128;
    const detail =
      problem.code === "undecodable_body"
        ? `The ${encoding} body holds ${problem.what} at ${where || "(body)"}, which the protocol does not allow`
        : `${command ?? "The"} body: ${where || "(body)"}: ${problem.what}`;
    return {
      ok: false,
      fault: fault(problem.code, detail, {
        ...extra,
        instancePath: where,
        ...(attemptId ? { attemptId } : {}),
        ...(echo ? { requestId } : {}),
      }),
    };
  }
  return { ok: true, value: value as Record<string, unknown>, encoding };
}

/** For a fault inside /results/N/..., that result's attempt_id when it is a well-formed id, so the ERROR can name it. */
function resultAttemptId(body: object, path: readonly string[]): string | undefined {
  if (path[0] !== "results" || path.length < 2) return undefined;
  const results = (body as { results?: unknown }).results;
  const item: unknown = Array.isArray(results) ? results[Number(path[1])] : undefined;
  const id = item && typeof item === "object" ? (item as { attempt_id?: unknown }).attempt_id : undefined;
  return typeof id === "string" && ID_PATTERN.test(id) ? id : undefined;
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
