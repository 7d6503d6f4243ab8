/**
 * Who the embedded server runs as. PostgreSQL refuses to run as root, so as
 * root the server runs as user `postgres`, which then has to own its files
 * and reach the data directory.
 */
import { execFileSync } from "node:child_process";
import fs from "node:fs/promises";
import path from "node:path";
import { EMBEDDED_SUPERUSER } from "./embeddedCredentials";
import type { Logger } from "./logger";

export function isRoot(): boolean {
  return process.getuid?.() === 0;
}

export interface UserIds {
  uid: number;
  gid: number;
}

export function postgresUserIds(): UserIds | undefined {
  try {
    const uid = Number(execFileSync("id", ["-u", EMBEDDED_SUPERUSER], { encoding: "utf8" }).trim());
    const gid = Number(execFileSync("id", ["-g", EMBEDDED_SUPERUSER], { encoding: "utf8" }).trim());
    return Number.isInteger(uid) && Number.isInteger(gid) ? { uid, gid } : undefined;
  } catch {
    return undefined;
  }
}

export function requirePostgresUserIds(): UserIds {
  const ids = postgresUserIds();
  if (ids === undefined) {
    throw new Error(`user ${EMBEDDED_SUPERUSER} does not exist, so PostgreSQL cannot run as root`);
  }
  return ids;
}

/**
 * As root the server runs as user `postgres`, which must be able to reach the
 * data directory: every ancestor needs the execute (traverse) bit for others.
 * Only that bit is added; nothing becomes readable that was not.
 */
export async function makeAncestorsTraversable(dir: string, logger: Logger): Promise<void> {
  for (let current = path.dirname(dir); ; current = path.dirname(current)) {
    const stat = await fs.stat(current);
    if ((stat.mode & 0o001) === 0) {
      logger.warn(
        { dir: current },
        "adding o+x to a parent of the PostgreSQL data directory so user postgres can reach it",
      );
      await fs.chmod(current, stat.mode | 0o001);
    }
    if (path.dirname(current) === current) break;
  }
}
