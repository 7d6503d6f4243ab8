/**
 * One pass over a MessagePack body's bytes, before msgpackr parses it:
 *  - nesting is counted, so a body of a million nested arrays is refused
 *    after MAX_DEPTH + 1 bytes instead of costing a recursive parse;
 *  - each str payload is checked with a fatal UTF-8 decoder, because msgpackr
 *    decodes a str leniently (bytes that are not UTF-8, CESU-8/WTF-8
 *    surrogates included, become some other text instead of an error) and the
 *    protocol says every string is UTF-8 in both encodings.
 * bin and extension payloads are stepped over (the caller refuses them
 * anyway). A truncated buffer just ends the scan: msgpackr then says what is
 * wrong with it.
 */

const utf8 = new TextDecoder("utf-8", { fatal: true });

export interface MsgpackScanProblem {
  problem: "too_deep" | "invalid_utf8";
  /** Offset of the container header or str that is at fault. */
  at: number;
}

/** The first problem in `buf` (depth over `maxDepth`, or a str that is not UTF-8), or undefined. */
export function scanMsgpack(buf: Uint8Array, maxDepth: number): MsgpackScanProblem | undefined {
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  let pos = 0;
  /** Reads a big-endian length of 1, 2 or 4 bytes and moves past it. */
  const length = (bytes: 1 | 2 | 4): number => {
    if (pos + bytes > buf.length) return 0;
    const n = bytes === 1 ? view.getUint8(pos) : bytes === 2 ? view.getUint16(pos) : view.getUint32(pos);
    pos += bytes;
    return n;
  };
  // Values still to read in each open container, innermost last (maps count two per entry).
  // Never longer than maxDepth: deeper is refused before it is pushed.
  const open: number[] = [];
  let rootRead = false;
  while (pos < buf.length) {
    while (open.length > 0 && open[open.length - 1] === 0) open.pop();
    if (open.length === 0) {
      if (rootRead) break;
      rootRead = true;
    } else open[open.length - 1]!--;
    const at = pos;
    const b = buf[pos++] as number;
    let items = -1;
    let strLen = -1;
    let skip = 0;
    if (b <= 0x7f || b >= 0xe0 || b === 0xc0 || b === 0xc2 || b === 0xc3) continue;
    if (b >= 0x80 && b <= 0x8f) items = 2 * (b & 0x0f);
    else if (b >= 0x90 && b <= 0x9f) items = b & 0x0f;
    else if (b >= 0xa0 && b <= 0xbf) strLen = b & 0x1f;
    else if (b === 0xd9) strLen = length(1);
    else if (b === 0xda) strLen = length(2);
    else if (b === 0xdb) strLen = length(4);
    else if (b === 0xc4) skip = length(1);
    else if (b === 0xc5) skip = length(2);
    else if (b === 0xc6) skip = length(4);
    else if (b === 0xc7) skip = 1 + length(1);
    else if (b === 0xc8) skip = 1 + length(2);
    else if (b === 0xc9) skip = 1 + length(4);
    else if (b === 0xca) pos += 4;
    else if (b === 0xcb) pos += 8;
    else if (b === 0xcc || b === 0xd0) pos += 1;
    else if (b === 0xcd || b === 0xd1) pos += 2;
    else if (b === 0xce || b === 0xd2) pos += 4;
    else if (b === 0xcf || b === 0xd3) pos += 8;
    else if (b === 0xd4) pos += 2;
    else if (b === 0xd5) pos += 3;
    else if (b === 0xd6) pos += 5;
    else if (b === 0xd7) pos += 9;
    else if (b === 0xd8) pos += 17;
    else if (b === 0xdc) items = length(2);
    else if (b === 0xdd) items = length(4);
    else if (b === 0xde) items = 2 * length(2);
    else if (b === 0xdf) items = 2 * length(4);
    // (bin and ext: their payload follows the length just read)
    pos += skip;
    if (items >= 0) {
      // An empty container still counts as a level, as `{}` does in JSON.
      if (open.length + 1 > maxDepth) return { problem: "too_deep", at };
      if (items > 0) open.push(items);
      continue;
    }
    if (strLen < 0) continue;
    const end = Math.min(pos + strLen, buf.length);
    // Plain ASCII is UTF-8; only strings with a high byte go to the decoder.
    let ascii = true;
    for (let i = pos; i < end; i++) {
      if ((buf[i] as number) > 0x7f) {
        ascii = false;
        break;
      }
    }
    if (!ascii) {
      try {
        utf8.decode(buf.subarray(pos, end));
      } catch {
        return { problem: "invalid_utf8", at };
      }
    }
    pos += strLen;
  }
  return undefined;
}

/** The offset of the first str whose bytes are not UTF-8, or -1 when every one is (depth unbounded). */
export function firstInvalidUtf8String(buf: Uint8Array): number {
  const p = scanMsgpack(buf, Number.POSITIVE_INFINITY);
  return p?.problem === "invalid_utf8" ? p.at : -1;
}
