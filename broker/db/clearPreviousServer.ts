/**
 * What an earlier run left in a data directory: a stale postmaster.pid, a
 * server orphaned by a broker killed with SIGKILL, or the live server of a
 * broker that still runs (which other commands may use, and which a start
 * must not take over).
 */
import fs from "node:fs/promises";
import path from "node:path";
import { EMBEDDED_ROLE, credentialsFile, readCredentials, socketUrl } from "./embeddedCredentials";
import type { Logger } from "./logger";

/**
 * The URL (as the `stepbroker` role) of an embedded server another stepbroker
 * process already runs in this data directory (a broker started with
 * `stepbroker start`), so commands such as `status` and `explain` can use it
 * instead of failing on the lock. Undefined when no live postgres holds the
 * directory, or when this OS user may not read its credentials file: another
 * user's server stays another user's.
 */
export async function runningEmbeddedUrl(dataDir: string): Promise<string | undefined> {
  const resolved = path.resolve(dataDir);
  let text: string;
  try {
    text = await fs.readFile(path.join(resolved, "postmaster.pid"), "utf8");
  } catch {
    return undefined;
  }
  const lines = text.split("\n");
  const pid = Number(lines[0]);
  const port = Number(lines[3]);
  const socketDir = lines[4]?.trim() ?? "";
  if (!Number.isInteger(pid) || pid <= 0 || !Number.isInteger(port) || port <= 0) return undefined;
  if (!(await isLive(pid, "postgres"))) return undefined;
  const credentials = await readCredentials(credentialsFile(resolved));
  if (credentials === undefined) return undefined;
  return socketUrl(EMBEDDED_ROLE, credentials.rolePassword, socketDir || credentials.socketDir, port);
}

/** The parent pid of a live process, from /proc (undefined when it cannot be read). */
async function parentPid(pid: number): Promise<number | undefined> {
  const stat = await fs.readFile(`/proc/${pid}/stat`, "utf8").catch(() => undefined);
  // pid (comm) state ppid ...: comm may hold spaces and parentheses, so read after the last ")"
  const ppid = Number(stat?.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
  return Number.isInteger(ppid) && ppid > 0 ? ppid : undefined;
}

/** True when `pid` is a live process whose command line contains `word`. */
async function isLive(pid: number, word: string): Promise<boolean> {
  try {
    process.kill(pid, 0);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "EPERM") return false;
  }
  const cmdline = await fs.readFile(`/proc/${pid}/cmdline`, "utf8").catch(() => word);
  return cmdline.includes(word);
}

/**
 * Before a start, whatever a previous run left in the data directory:
 * - a postmaster.pid whose process is gone (or is no postgres) is stale and removed;
 * - a postgres whose parent is no longer a Node.js process was orphaned by a
 *   broker killed with SIGKILL (its server outlives it); it is stopped (fast
 *   shutdown), so a killed broker's next start does not find its directory taken;
 * - a postgres whose parent lives is another running broker's: refused.
 */
export async function clearPreviousServer(dataDir: string, logger: Logger): Promise<void> {
  const pidFile = path.join(dataDir, "postmaster.pid");
  let text: string;
  try {
    text = await fs.readFile(pidFile, "utf8");
  } catch {
    return;
  }
  const pid = Number(text.split("\n")[0]);
  if (Number.isInteger(pid) && pid > 0 && (await isLive(pid, "postgres"))) {
    const ppid = await parentPid(pid);
    const orphaned = ppid === undefined || ppid === 1 || !(await isLive(ppid, "node"));
    if (!orphaned) {
      throw new Error(
        `PostgreSQL data directory ${dataDir} is in use by process ${pid}; stop it, or set DATABASE_URL to use that server`,
      );
    }
    logger.warn(
      { dataDir, pid, parent: ppid },
      `stopping the embedded PostgreSQL (pid ${pid}) that a killed broker left running in ${dataDir}`,
    );
    // SIGINT is postgres's fast shutdown: sessions end, the checkpoint is written, the pid file goes.
    process.kill(pid, "SIGINT");
    const deadline = Date.now() + 30_000;
    while (await isLive(pid, "postgres")) {
      if (Date.now() > deadline)
        throw new Error(
          `the orphaned PostgreSQL (pid ${pid}) in ${dataDir} did not stop within 30 s; stop it by hand`,
        );
      await new Promise((r) => setTimeout(r, 50));
    }
    return;
  }
  logger.warn({ pidFile, pid }, "removing stale postmaster.pid left by a previous run");
  await fs.rm(pidFile, { force: true });
}
