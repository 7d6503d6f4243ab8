/**
 * The HTTP server's bearer token. Compared in constant time on SHA-256
 * digests (equal lengths whatever was sent, so neither the comparison nor the
 * length check tells an attacker how much of a guess was right).
 */
import { createHash, timingSafeEqual } from "node:crypto";
import { readFileSync } from "node:fs";

const digest = (s: string): Buffer => createHash("sha256").update(s, "utf8").digest();

export class HttpAuth {
  private readonly expected: Buffer | undefined;

  constructor(token: string | undefined) {
    const t = token?.trim();
    if (t !== undefined && t.length < 16)
      throw new Error("the HTTP token must be at least 16 characters (e.g. openssl rand -hex 32)");
    this.expected = t === undefined ? undefined : digest(t);
  }

  /** Reads a token file (its first line; a file with no token is an error, not an open server). */
  static fromFile(file: string): HttpAuth {
    let text: string;
    try {
      text = readFileSync(file, "utf8");
    } catch (e) {
      throw new Error(`cannot read the HTTP token file ${file}: ${(e as Error).message}`, { cause: e });
    }
    const line = text.split(/\r?\n/)[0]?.trim() ?? "";
    if (line === "") throw new Error(`the HTTP token file ${file} is empty; write a token on its first line`);
    return new HttpAuth(line);
  }

  get enabled(): boolean {
    return this.expected !== undefined;
  }

  /** True when no token is configured, or the Authorization header carries it ("Bearer <token>"). */
  allows(authorization: string | undefined): boolean {
    if (this.expected === undefined) return true;
    const m = /^Bearer\s+(.+)$/i.exec(authorization ?? "");
    return timingSafeEqual(digest(m?.[1]?.trim() ?? ""), this.expected) && m !== null;
  }
}
