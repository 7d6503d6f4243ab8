/**
 * Time-ordered UUIDs (RFC 9562 version 7: 48 bits of Unix milliseconds, then
 * random bits) for ids this process creates. Index pages of ids that grow
 * with time stay together and warm; random (v4) ids scatter every insert
 * over the whole index. SQL creates the others with new_id() (sql/functions/new_id.sql).
 */
import { randomFillSync } from "node:crypto";

const bytes = Buffer.alloc(16);

export function uuidv7(now: number = Date.now()): string {
  randomFillSync(bytes, 6, 10);
  bytes.writeUIntBE(now, 0, 6);
  bytes[6] = 0x70 | ((bytes[6] ?? 0) & 0x0f);
  bytes[8] = 0x80 | ((bytes[8] ?? 0) & 0x3f);
  const h = bytes.toString("hex");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}
