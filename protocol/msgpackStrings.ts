/**
 * msgpackr decodes a MessagePack str leniently: bytes that are not UTF-8
 * become some other text instead of an error. The protocol says every string
 * is UTF-8 in both encodings, so a MessagePack body is walked once more and
 * each str payload checked with a fatal decoder. Runs after msgpackr has
 * accepted the buffer, so the structure is known to be whole; bin and
 * extension payloads are stepped over (the caller refuses them anyway).
 */

const utf8 = new TextDecoder("utf-8", { fatal: true });

/** The offset of the first str whose bytes are not UTF-8, or -1 when every one is. */
export function firstInvalidUtf8String(buf: Uint8Array): number {
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  let pos = 0;
  /** Reads a big-endian length of 1, 2 or 4 bytes and moves past it. */
  const length = (bytes: 1 | 2 | 4): number => {
    const n = bytes === 1 ? view.getUint8(pos) : bytes === 2 ? view.getUint16(pos) : view.getUint32(pos);
    pos += bytes;
    return n;
  };
  // Values still to read; maps count two per entry.
  let pending = 1;
  while (pending > 0 && pos < buf.length) {
    pending--;
    const at = pos;
    const b = buf[pos++] as number;
    let strLen = -1;
    let skip = 0;
    if (b <= 0x7f || b >= 0xe0 || b === 0xc0 || b === 0xc2 || b === 0xc3) continue;
    if (b >= 0x80 && b <= 0x8f) pending += 2 * (b & 0x0f);
    else if (b >= 0x90 && b <= 0x9f) pending += b & 0x0f;
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
    else if (b === 0xdc) pending += length(2);
    else if (b === 0xdd) pending += length(4);
    else if (b === 0xde) pending += 2 * length(2);
    else if (b === 0xdf) pending += 2 * length(4);
    // (bin and ext: their payload follows the length just read)
    pos += skip;
    if (strLen < 0) continue;
    // Plain ASCII is UTF-8; only strings with a high byte go to the decoder.
    let ascii = true;
    for (let i = pos; i < pos + strLen; i++) {
      if ((buf[i] as number) > 0x7f) {
        ascii = false;
        break;
      }
    }
    if (!ascii) {
      try {
        utf8.decode(buf.subarray(pos, pos + strLen));
      } catch {
        return at;
      }
    }
    pos += strLen;
  }
  return -1;
}
