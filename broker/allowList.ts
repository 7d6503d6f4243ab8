/**
 * Allow-list files: Z85 public keys, one a line, `#` comments allowed (a
 * `stepbroker keygen` .pub file is a valid one-key list). The CLI reads one
 * per socket at start and again on SIGHUP; a file that does not parse keeps
 * the old list, so a typo never locks every pool out.
 */
import { readFileSync } from "node:fs";
import type { Logger } from "pino";
import { isZ85Key, keyFileLines } from "../protocol/curveKeys";
import type { Role } from "./roles";

/** The keys in an allow-list file; throws naming the file and line of the first bad one. */
export function readAllowList(file: string): string[] {
  const keys: string[] = [];
  for (const l of keyFileLines(readFileSync(file, "utf8"))) {
    if (!isZ85Key(l.text))
      throw new Error(
        `${file}:${l.line} is not a 40-character Z85 public key; put one key a line (copy a .pub file written by stepbroker keygen)`,
      );
    keys.push(l.text);
  }
  return keys;
}

export type AllowListFiles = Partial<Record<Role, string>>;

/** What a broker offers for reloading (Broker.setAllowedKeys). */
export interface AllowListTarget {
  setAllowedKeys(name: Role, keys: string[]): { added: string[]; removed: string[] };
}

/**
 * Reads every file again and gives each socket its new list. Returns the
 * sockets whose list could not be replaced (each logged with why; it keeps its old list).
 */
export function reloadAllowLists(target: AllowListTarget, files: AllowListFiles, log: Logger): Role[] {
  const failed: Role[] = [];
  for (const [name, file] of Object.entries(files) as [Role, string][]) {
    try {
      target.setAllowedKeys(name, readAllowList(file));
    } catch (e) {
      failed.push(name);
      log.error(
        { zap_domain: name, file, err: e instanceof Error ? e.message : String(e) },
        `kept the old ${name} allow-list: ${e instanceof Error ? e.message : String(e)}; fix ${file} and send SIGHUP again`,
      );
    }
  }
  return failed;
}
