/**
 * The request_id of a client request the broker refuses, so its ERROR can
 * carry it and the client can tell which request failed instead of waiting
 * for a reply that never comes. Rules (PROTOCOL.md, "Clients"):
 *  - a body that decoded but failed its schema: its top-level `request_id`;
 *  - a body over max_message_bytes is not parsed (that is the point of the
 *    limit): the first and the last 1 KiB are scanned for a `request_id`
 *    key with a string value, in JSON or MessagePack. Clients put
 *    `request_id` first in the body so that it is found.
 * Undefined when there is none a valid ERROR may echo (1 to 128 code points).
 */
import { ClientCommands, decodeBody, sniffEncoding, type ProtocolFault } from "../../protocol";

const CLIENT_COMMANDS = new Set<string>(Object.values(ClientCommands));
/** How much of each end of an oversized body is scanned. */
export const REQUEST_ID_SCAN_BYTES = 1024;

// A JSON string literal; control characters cannot occur in one, and JSON.parse below refuses them.
const JSON_KEY = /"request_id"\s*:\s*("(?:[^"\\]|\\.){1,1024}")/;
/** MessagePack fixstr "request_id". */
const MSGPACK_KEY = Buffer.concat([Buffer.from([0xaa]), Buffer.from("request_id")]);
const utf8 = new TextDecoder("utf-8", { fatal: true });

export function requestIdOf(f: ProtocolFault, body: Uint8Array | undefined): string | undefined {
  if (!body || !CLIENT_COMMANDS.has(f.command ?? "")) return undefined;
  if (f.code === "schema_violation" || f.code === "forbidden") {
    const decoded = decodeBody(body);
    return valid(decoded.ok ? decoded.value.request_id : undefined);
  }
  if (f.code !== "message_too_large") return undefined;
  const buf = Buffer.from(body.buffer, body.byteOffset, body.byteLength);
  const head = buf.subarray(0, REQUEST_ID_SCAN_BYTES);
  const tail = buf.subarray(Math.max(0, buf.length - REQUEST_ID_SCAN_BYTES));
  const encoding = sniffEncoding(head);
  if (encoding === undefined) return undefined;
  const scan = encoding === "json" ? scanJson : scanMsgpack;
  return scan(head) ?? scan(tail);
}

function valid(id: unknown): string | undefined {
  return typeof id === "string" && id.length > 0 && [...id].length <= 128 ? id : undefined;
}

function scanJson(part: Buffer): string | undefined {
  const m = JSON_KEY.exec(part.toString("utf8"));
  if (!m?.[1]) return undefined;
  try {
    return valid(JSON.parse(m[1]));
  } catch {
    return undefined;
  }
}

function scanMsgpack(part: Buffer): string | undefined {
  const at = part.indexOf(MSGPACK_KEY);
  if (at < 0) return undefined;
  let i = at + MSGPACK_KEY.length;
  const marker = part[i];
  if (marker === undefined) return undefined;
  let len: number;
  if (marker >= 0xa0 && marker <= 0xbf) len = marker & 0x1f;
  else if (marker === 0xd9 && part[i + 1] !== undefined) len = part[++i]!;
  else return undefined;
  const bytes = part.subarray(i + 1, i + 1 + len);
  if (bytes.length !== len) return undefined;
  try {
    return valid(utf8.decode(bytes));
  } catch {
    return undefined;
  }
}
