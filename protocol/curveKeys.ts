/**
 * CURVE key files as `stepbroker keygen` writes them, for brokers, pools and
 * clients alike:
 *
 *   PREFIX.key  mode 0600, both halves of the pair:
 *                 public-key = <40 Z85 characters>
 *                 secret-key = <40 Z85 characters>
 *   PREFIX.pub  the public key alone, one line: what the other side puts in
 *               its allow-list or passes as the server key.
 *
 * A public key can also be given inline (40 Z85 characters) wherever a .pub
 * file is accepted, so a key can be pasted into a command line.
 */
import { closeSync, existsSync, openSync, readFileSync, writeSync } from "node:fs";
import { curveKeyPair } from "zeromq";

export interface CurveKeyPair {
  publicKey: string;
  secretKey: string;
}

const Z85_KEY = /^[0-9a-zA-Z.\-:+=^!/*?&<>()[\]{}@%$#]{40}$/;

export function isZ85Key(text: string): boolean {
  return Z85_KEY.test(text);
}

/**
 * The meaningful lines of a key or allow-list file: blank lines and comments
 * dropped. A comment is a line starting with `#`, or `#` after whitespace at
 * the end of a line ("KEY  # alice's laptop"); a `#` inside a key is part of
 * it (Z85 uses the character).
 */
export function keyFileLines(text: string): { line: number; text: string }[] {
  return text
    .split("\n")
    .map((raw, i) => ({ line: i + 1, text: raw.trim() }))
    .filter((l) => l.text.length > 0 && !l.text.startsWith("#"))
    .map((l) => ({ line: l.line, text: l.text.replace(/\s+#.*$/, "") }));
}

/** Reads a key pair written by `stepbroker keygen`; throws naming the file and line when it is not one. */
export function readKeyPairFile(file: string): CurveKeyPair {
  const found: Partial<Record<"public-key" | "secret-key", string>> = {};
  for (const l of keyFileLines(readFileSync(file, "utf8"))) {
    const m = /^(public-key|secret-key)\s*=\s*(\S+)$/.exec(l.text);
    if (!m || !isZ85Key(m[2]!))
      throw new Error(
        `${file}:${l.line} is not "public-key = KEY" or "secret-key = KEY" with a 40-character Z85 key; write the file with stepbroker keygen`,
      );
    found[m[1] as "public-key" | "secret-key"] = m[2]!;
  }
  if (!found["public-key"] || !found["secret-key"])
    throw new Error(`${file} lacks a public-key or secret-key line; write the file with stepbroker keygen`);
  return { publicKey: found["public-key"], secretKey: found["secret-key"] };
}

/** A public key given inline, or the file holding it (a .pub file, or a .key file's public half). */
export function readPublicKey(keyOrFile: string): string {
  if (isZ85Key(keyOrFile)) return keyOrFile;
  let text: string;
  try {
    text = readFileSync(keyOrFile, "utf8");
  } catch (e) {
    throw new Error(`${JSON.stringify(keyOrFile)} is neither a 40-character Z85 key nor a readable file`, {
      cause: e,
    });
  }
  const lines = keyFileLines(text);
  if (lines.length === 1 && isZ85Key(lines[0]!.text)) return lines[0]!.text;
  return readKeyPairFile(keyOrFile).publicKey;
}

/**
 * Writes PREFIX.key (0600) and PREFIX.pub; never overwrites either, so a
 * broker's identity is not replaced by a mistyped command.
 */
export function writeKeyPairFiles(prefix: string): CurveKeyPair & { keyFile: string; pubFile: string } {
  const pair = curveKeyPair();
  const keyFile = `${prefix}.key`;
  const pubFile = `${prefix}.pub`;
  for (const f of [keyFile, pubFile])
    if (existsSync(f)) throw new Error(`${f} exists; remove it or choose another --out prefix`);
  // "wx" fails with EEXIST instead of truncating; the mode applies at creation, before any byte is written.
  const keyFd = openSync(keyFile, "wx", 0o600);
  try {
    writeSync(
      keyFd,
      `# stepbroker CURVE key pair: keep this file secret\npublic-key = ${pair.publicKey}\nsecret-key = ${pair.secretKey}\n`,
    );
  } finally {
    closeSync(keyFd);
  }
  const pubFd = openSync(pubFile, "wx", 0o644);
  try {
    writeSync(pubFd, `${pair.publicKey}\n`);
  } finally {
    closeSync(pubFd);
  }
  return { ...pair, keyFile, pubFile };
}
