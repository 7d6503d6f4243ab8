/**
 * What the end-to-end benchmarks share: creating tasks up front in batches,
 * counting committed results as the broker sees them, without polling the
 * database (the first commit starts the clock, so it is not counted in the
 * rate), the database a run uses, and starting the broker with one pool
 * process.
 */
import { spawn } from "node:child_process";
import { readdirSync, readFileSync } from "node:fs";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import pg from "pg";
import { pino } from "pino";
import { Broker } from "../broker/Broker";
import { startEmbeddedPostgres, type EmbeddedServer } from "../broker/db/embedded";
import { EMBEDDED_ROLE } from "../broker/db/embeddedCredentials";
import { openDatabase } from "../broker/db/openDatabase";
import { stopOnSignals } from "../broker/db/stopOnSignals";
import { StateManager } from "../broker/state/StateManager";
import type { CreateTaskRequest } from "../broker/state/types";

/** Drops a benchmark's schema (its name is a constant of the benchmark, never input). */
export async function dropBenchSchema(url: string, schema: string): Promise<void> {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  await c.query(`drop schema if exists ${schema} cascade`);
  await c.end();
}

/** A fresh, migrated schema for one measurement, with a quiet logger. */
export async function openBenchState(url: string, schema: string): Promise<StateManager> {
  await dropBenchSchema(url, schema);
  const logger = pino({ level: process.env.BENCH_LOG_LEVEL ?? "warn" });
  const db = await openDatabase({ databaseUrl: url, schema, poolSize: 12, logger });
  const sm = new StateManager(db);
  await sm.migrate();
  return sm;
}

export async function createTasksInBatches(
  sm: StateManager,
  count: number,
  namespace: string,
  name: string,
): Promise<void> {
  for (let i = 0; i < count; i += 5000) {
    const batch: CreateTaskRequest[] = [];
    for (let j = i; j < Math.min(count, i + 5000); j++) batch.push({ namespace, name, context: { n: j } });
    await sm.createTasks(batch);
  }
}

export interface CommitCounter {
  /** The state manager to give the broker: the real one, with completions counted. */
  readonly state: StateManager;
  /** Resolves once `total` results are stored, or when finish() is called. */
  readonly done: Promise<void>;
  finish(): void;
  stored(): number;
  seconds(): number;
  stepsPerSecond(): number;
}

export function countCommits(sm: StateManager, total: number): CommitCounter {
  let stored = 0;
  let first = 0;
  let last = 0;
  let finish: () => void = () => undefined;
  const done = new Promise<void>((r) => (finish = r));
  const counting = Object.create(sm) as StateManager;
  counting.completeAttempts = async (results, claim) => {
    const out = await sm.completeAttempts(results, claim);
    const now = performance.now();
    if (first === 0) first = now;
    last = now;
    stored += out.outcomes.filter((o) => o.outcome === "stored").length;
    if (stored >= total) finish();
    return out;
  };
  const seconds = () => (last - first) / 1000;
  return {
    state: counting,
    done,
    finish: () => finish(),
    stored: () => stored,
    seconds: () => Math.round(seconds() * 100) / 100,
    stepsPerSecond: () => Math.round(Math.max(0, stored - 1) / Math.max(seconds(), 1e-3)),
  };
}

export interface BenchPool {
  /** Names the pool in errors: "node", "python", "ruby". */
  label: string;
  cmd: string;
  args: (endpoint: string) => string[];
  cwd?: string;
}

export interface BenchRun {
  broker: Broker;
  /** CPU time (user + system, in µs) the pool process has used so far; undefined where /proc cannot say. */
  poolCpuMicros(): number | undefined;
  /** Ends the pool (SIGTERM, then SIGKILL after 10 s) and then stops the broker. */
  stop(): Promise<void>;
}

/**
 * Starts a broker on tcp loopback over `state` (the counting one) and the pool
 * process `cmd args(endpoint)`, and resolves once the pool prints READY. A pool
 * that exits first rejects, with the broker already stopped.
 */
export async function startBrokerAndPool(
  state: StateManager,
  pool: BenchPool,
  /** Runs once the broker is bound, before the pool connects (say, to observe it with metrics). */
  beforePool?: (broker: Broker) => void,
): Promise<BenchRun> {
  const broker = new Broker({
    endpoints: ["tcp://127.0.0.1:*"],
    state,
    brokerId: "bench",
    logger: pino({ level: process.env.BENCH_LOG_LEVEL ?? "warn" }),
    pollMs: 200,
  });
  await broker.start();
  beforePool?.(broker);
  const child = spawn(pool.cmd, pool.args(broker.endpoints[0]!), {
    ...(pool.cwd !== undefined ? { cwd: pool.cwd } : {}),
    stdio: ["ignore", "pipe", "inherit"],
  });
  const exited = new Promise<void>((r) => child.once("exit", () => r()));
  const stop = async (): Promise<void> => {
    child.kill("SIGTERM");
    const force = setTimeout(() => child.kill("SIGKILL"), 10_000);
    await exited;
    clearTimeout(force);
    await broker.stop({ drainMs: 1000 });
  };
  try {
    await new Promise<void>((resolve, reject) => {
      createInterface({ input: child.stdout! }).on("line", (l) => l.startsWith("READY") && resolve());
      child.once("exit", (code) => reject(new Error(`${pool.label} bench pool exited with ${code}`)));
    });
  } catch (err) {
    await stop();
    throw err;
  }
  return {
    broker,
    stop,
    poolCpuMicros: () => (child.pid === undefined ? undefined : processCpuMicros(child.pid)),
  };
}

/** Clock ticks per second of /proc's utime and stime: 100 on every Linux build Node runs on. */
const CLOCK_TICKS = 100;

/** A child's CPU time (user + system) in µs, from /proc/<pid>/stat; undefined without /proc. */
export function processCpuMicros(pid: number): number | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // after the ")" that closes the command name: state is field 3, utime 14 and stime 15
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    const ticks = Number(fields[11]) + Number(fields[12]);
    return Number.isFinite(ticks) ? (ticks * 1e6) / CLOCK_TICKS : undefined;
  } catch {
    return undefined;
  }
}

/**
 * CPU time (user + system, in µs) a local PostgreSQL server has used so far:
 * the postmaster, the children it has reaped, and its live children (backends,
 * walwriter, checkpointer…). Undefined where /proc or the data directory's
 * postmaster.pid cannot say (a remote DATABASE_URL). The difference of two
 * readings is the server's work in between, backends that ended meanwhile
 * included, as they move into the postmaster's reaped-children time.
 */
export function serverCpuMicros(dataDir: string): number | undefined {
  let postmaster: number;
  try {
    postmaster = Number(readFileSync(path.join(dataDir, "postmaster.pid"), "utf8").split("\n")[0]);
  } catch {
    return undefined;
  }
  // after the ")" that closes the command name: ppid is field 4, utime..cstime 14..17
  const fieldsOf = (pid: string | number): string[] | undefined => {
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
      return stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    } catch {
      return undefined; // ended between the listing and the read: its time is in the postmaster's
    }
  };
  const own = fieldsOf(postmaster);
  if (own === undefined) return undefined;
  let ticks = Number(own[11]) + Number(own[12]) + Number(own[13]) + Number(own[14]);
  for (const pid of readdirSync("/proc")) {
    if (!/^\d+$/.test(pid)) continue;
    const f = fieldsOf(pid);
    if (f !== undefined && Number(f[1]) === postmaster) ticks += Number(f[11]) + Number(f[12]);
  }
  return Number.isFinite(ticks) ? (ticks * 1e6) / CLOCK_TICKS : undefined;
}

/** µs per unit of work between two readings of a CPU clock, one decimal; undefined if either is. */
export function cpuPerUnit(
  before: number | undefined,
  after: number | undefined,
  units: number,
): number | undefined {
  if (before === undefined || after === undefined || units <= 0) return undefined;
  return Math.round(((after - before) / units) * 10) / 10;
}

export interface BenchDatabase {
  url: string;
  /** The embedded server, when DATABASE_URL was not set and this run started one. */
  server?: EmbeddedServer;
  /** Stops the embedded server, if any, and removes its temp directory. */
  close(): Promise<void>;
}

/**
 * The benchmarks connect as the broker's own non-superuser role; each phase
 * starts from a CHECKPOINT (./checkpoint.ts), which needs pg_checkpoint. Only
 * this throwaway server gets that grant: a broker's embedded server does not.
 */
async function allowCheckpoints(server: EmbeddedServer): Promise<void> {
  const admin = new pg.Client({ connectionString: server.adminUrl });
  await admin.connect();
  try {
    await admin.query(`grant pg_checkpoint to ${EMBEDDED_ROLE}`);
  } finally {
    await admin.end();
  }
}

/**
 * Where a benchmark keeps what is slow to build and the same from run to run
 * (the claims benchmark's ten million finished steps): DATABASE_URL when set,
 * else an embedded PostgreSQL (durable commits, default settings) in a data
 * directory that outlives the run, BENCH_CACHE_DIR or
 * /var/tmp/stepbroker-bench (kept across reboots, and enterable by the
 * postgres user a root run hands the server to). close() stops the server and
 * keeps the directory; delete it to reclaim the space.
 */
export async function openCachedBenchDatabase(log: (line: string) => void): Promise<BenchDatabase> {
  const given = process.env.DATABASE_URL ?? "";
  if (given) return { url: given, close: async () => undefined };
  const dir = process.env.BENCH_CACHE_DIR || path.join("/var/tmp", "stepbroker-bench");
  await fs.mkdir(dir, { recursive: true, mode: 0o755 });
  log(`starting the embedded PostgreSQL kept in ${dir} (durable commits, default settings)`);
  const server = await startEmbeddedPostgres({ dataDir: path.join(dir, "pgdata") });
  const stop = () =>
    server
      .stop()
      .catch((err: unknown) =>
        log(`stopping PostgreSQL failed: ${err instanceof Error ? err.message : String(err)}`),
      );
  // Ctrl-C stops the server; the directory, the point of this one, stays
  const unhook = stopOnSignals(stop, log);
  await allowCheckpoints(server);
  return {
    url: server.url,
    server,
    close: () => {
      unhook();
      return stop();
    },
  };
}

/**
 * DATABASE_URL when set; otherwise an embedded PostgreSQL (durable commits,
 * default settings, unless `postgresFlags` say otherwise) in a fresh temp
 * directory. `onTempDir` hears of that directory as soon as it exists, so an
 * exit hook can remove it.
 */
export async function openBenchDatabase(
  log: (line: string) => void,
  onTempDir?: (dir: string) => void,
  postgresFlags: string[] = [],
): Promise<BenchDatabase> {
  const given = process.env.DATABASE_URL ?? "";
  if (given) return { url: given, close: async () => undefined };
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "stepbroker-bench-"));
  onTempDir?.(dir);
  let server: EmbeddedServer | undefined;
  const close = async (): Promise<void> => {
    await server
      ?.stop()
      .catch((err: unknown) =>
        log(`stopping PostgreSQL failed: ${err instanceof Error ? err.message : String(err)}`),
      );
    await fs.rm(dir, { recursive: true, force: true });
  };
  // Ctrl-C on a benchmark stops its server and removes its directory too
  const unhook = stopOnSignals(close, log);
  try {
    await fs.chmod(dir, 0o755);
    log(
      `starting an embedded PostgreSQL (${postgresFlags.length > 0 ? postgresFlags.join(" ") : "durable commits, default settings"})`,
    );
    server = await startEmbeddedPostgres({ dataDir: path.join(dir, "pgdata"), postgresFlags });
    await allowCheckpoints(server);
  } catch (err) {
    unhook();
    await close();
    throw err;
  }
  return {
    url: server.url,
    server,
    close: async () => {
      unhook();
      await close();
    },
  };
}
