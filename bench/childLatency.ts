/**
 * Where the milliseconds of "parent commit -> child at pool" go, one diamond
 * at a time, as bench/stepbroker.ts measures it (from the parent's finished_at,
 * the now() of its commit transaction, to the child's handler running in the
 * pool process), split by real timestamps taken on the way:
 *
 *   in PostgreSQL     finished_at -> the commit record's timestamp (the
 *                     statement's own work: complete, ready, claim)
 *   flush + reply     commit timestamp -> the broker has the statement's rows
 *                     (the WAL flush of a durable commit, and the reply)
 *   broker            rows -> the STEP handed to the ROUTER socket
 *   zeromq + tcp      handed to the socket -> the pool's socket returned it
 *   pool              received -> the handler runs
 *
 * and, beside it, the floor no broker can beat on this machine: single-row
 * INSERTs that each commit durably, one after another, on the same server
 * (with a bare `select 1` for the round trip alone), and the server's fsync,
 * wal_sync_method and synchronous_commit.
 *
 * It starts its own embedded server, as bench/run.ts does (durable commits,
 * default settings), plus track_commit_timestamp=on, which the split needs;
 * the broker and the pool are the real ones over tcp on loopback. Timestamps
 * are wall clock (PostgreSQL's, and performance.timeOrigin + now() in both
 * Node processes, as bench/pool.ts stamps); the clock offset between this
 * process and the server is measured and printed.
 *   node --import tsx bench/childLatency.ts [--tasks 100] [--commits 500] [--json] [--async-commit]
 * --statements lists the statements (nested ones too, pg_stat_statements) that
 * took the most time, to split the time in PostgreSQL. --async-commit runs the server with synchronous_commit=off, to show what the
 * WAL flush costs: a diagnostic, never how stepbroker stores results.
 */
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import pg from "pg";
import { pino } from "pino";
import * as zmq from "zeromq";
import { HandlerPool } from "../handlers-node";
import { decodeBody } from "../protocol";
import { dropBenchSchema, openBenchDatabase, openBenchState, startBrokerAndPool } from "./harness";
import { DIAMOND } from "./stepbroker";

const SCHEMA = "bench_child_latency";
const FLOOR_SCHEMA = "bench_commit_floor";

/** Wall clock in ms with sub-ms precision, the same expression in both processes. */
const wall = (): number => performance.timeOrigin + performance.now();

/** The breakdown's figures: p50 and p99 of each segment, and the floor beside them. */
export interface ChildLatencyResult {
  children: number;
  /** Children the commit of their parents claimed, rather than a later dispatch round. */
  claimedByCommit: number;
  /** The bench's figure for the other children (claimed by a dispatch round), sorted. */
  claimedLaterMs: number[];
  /** complete_attempts calls per diamond (3 when b and c are stored together). */
  commitsPerDiamond: number;
  /** From SUBMIT to the task's end, per diamond. */
  diamondMs: { p50: number; p99: number };
  /** WAL the server wrote during the diamonds (task creation and claims too), per result commit. */
  walBytesPerCommit: number;
  segments: Record<string, { p50: number; p99: number }>;
  floor: {
    commitP50: number;
    commitP99: number;
    walBytesPerCommit: number;
    roundTripP50: number;
    roundTripP99: number;
  };
  settings: Record<string, string>;
  /** This process's clock minus the server's, estimated from round trips (ms). */
  clockOffsetMs: number;
  /** With `adminUrl`: the statements that took the most time during the diamonds, nested ones included. */
  statements?: { query: string; calls: number; meanMs: number }[];
}

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] ?? NaN;
}

function summary(values: number[]): { p50: number; p99: number } {
  const s = [...values].sort((a, b) => a - b);
  const r = (x: number) => Math.round(x * 1000) / 1000;
  return { p50: r(percentile(s, 50)), p99: r(percentile(s, 99)) };
}

/** Round trips of `sql` on one connection, one after another, in ms. */
async function timeStatements(c: pg.Client, sql: string, n: number, params: (i: number) => unknown[]) {
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const t = performance.now();
    await c.query({ name: sql.slice(0, 40), text: sql, values: params(i) });
    out.push(performance.now() - t);
  }
  return out;
}

async function walLsn(c: pg.Client | pg.Pool): Promise<string> {
  return (await c.query<{ lsn: string }>("select pg_current_wal_lsn()::text as lsn")).rows[0]!.lsn;
}

async function walBytesSince(c: pg.Client | pg.Pool, lsn: string): Promise<number> {
  const { rows } = await c.query<{ n: string }>(
    "select pg_wal_lsn_diff(pg_current_wal_lsn(), $1)::text as n",
    [lsn],
  );
  return Number(rows[0]!.n);
}

async function measureFloor(url: string, commits: number) {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  try {
    const settings: Record<string, string> = {};
    for (const name of [
      "fsync",
      "wal_sync_method",
      "synchronous_commit",
      "commit_delay",
      "full_page_writes",
      "track_commit_timestamp",
      "server_version",
    ]) {
      const { rows } = await c.query<{ v: string }>(`select current_setting($1) as v`, [name]);
      settings[name] = rows[0]!.v;
    }
    // The offset: the server's clock read halfway through the round trip, against ours.
    const offsets: number[] = [];
    for (let i = 0; i < 50; i++) {
      const before = wall();
      const { rows } = await c.query<{ t: number }>(
        "select extract(epoch from clock_timestamp()) * 1000 as t",
      );
      const after = wall();
      offsets.push((before + after) / 2 - Number(rows[0]!.t));
    }
    await c.query(`drop schema if exists ${FLOOR_SCHEMA} cascade`);
    await c.query(`create schema ${FLOOR_SCHEMA}`);
    // A plain table: a temporary or unlogged one would write no WAL and flush nothing.
    await c.query(`create table ${FLOOR_SCHEMA}.t (id bigint primary key)`);
    const walBefore = await walLsn(c);
    const commit = await timeStatements(c, `insert into ${FLOOR_SCHEMA}.t values ($1)`, commits, (i) => [i]);
    const floorWal = (await walBytesSince(c, walBefore)) / commits;
    const roundTrip = await timeStatements(c, "select $1::int", commits, (i) => [i]);
    await c.query(`drop schema ${FLOOR_SCHEMA} cascade`);
    const cs = summary(commit);
    const rt = summary(roundTrip);
    return {
      settings,
      clockOffsetMs: summary(offsets).p50,
      floor: {
        commitP50: cs.p50,
        commitP99: cs.p99,
        walBytesPerCommit: Math.round(floorWal),
        roundTripP50: rt.p50,
        roundTripP99: rt.p99,
      },
    };
  } finally {
    await c.end();
  }
}

function patch<T extends object, K extends keyof T>(target: T, key: K, value: T[K]): void {
  Object.defineProperty(target, key, { value, writable: true, configurable: true });
}

interface CommitTimes {
  sentAt: number;
  rowsAt: number;
}

/** The STEP bodies the broker hands its ROUTER sockets, by step id: when send() was called. */
function watchStepSends(handedAt: Map<string, number>): () => void {
  const proto = zmq.Router.prototype as { send: zmq.Router["send"] };
  const original = proto.send;
  // An own property shadows the native one (which is read-only on the prototype chain).
  patch(proto, "send", function (this: zmq.Router, message) {
    const at = wall();
    const frames = Array.isArray(message) ? message : [message];
    if (frames.length === 4 && String(frames[2]) === "STEP") {
      const body = decodeBody(frames[3] as Uint8Array, "STEP");
      if (body.ok)
        for (const s of body.value.steps as { step_id: string }[])
          if (!handedAt.has(s.step_id)) handedAt.set(s.step_id, at);
    }
    return original.call(this, message);
  } as zmq.Router["send"]);
  return () => patch(proto, "send", original);
}

export async function measureChildLatency(opts: {
  url: string;
  tasks: number;
  commits: number;
  /** A superuser URL of a server preloading pg_stat_statements (track=all): the statements are listed. */
  adminUrl?: string;
  log: (line: string) => void;
}): Promise<ChildLatencyResult> {
  const { log } = opts;
  log(`commit floor: ${opts.commits} single-row INSERTs, each its own durable commit`);
  const floor = await measureFloor(opts.url, opts.commits);
  const sm = await openBenchState(opts.url, SCHEMA);
  await sm.registerTemplate(DIAMOND);

  // The state manager the broker gets: the real one, with each commit's round trip timed.
  const commits = new Map<string, CommitTimes>();
  let commitCalls = 0;
  const timed = Object.create(sm) as typeof sm;
  timed.completeAttempts = async (results, claim) => {
    commitCalls++;
    const sentAt = wall();
    const out = await sm.completeAttempts(results, claim);
    const rowsAt = wall();
    for (const c of out.claimed) commits.set(c.step_id, { sentAt, rowsAt });
    return out;
  };
  const handedAt = new Map<string, number>();
  const unwatch = watchStepSends(handedAt);
  const { broker, stop } = await startBrokerAndPool(timed, {
    label: "node",
    cmd: process.execPath,
    args: (endpoint) => ["--import", "tsx", import.meta.filename, "--pool", endpoint],
  });
  const diamonds: number[] = [];
  let commitsPerDiamond: number | undefined;
  let walPerCommit: number | undefined;
  const admin = opts.adminUrl === undefined ? undefined : new pg.Client({ connectionString: opts.adminUrl });
  let statements: ChildLatencyResult["statements"];
  try {
    if (admin) {
      await admin.connect();
      await admin.query("create extension if not exists pg_stat_statements");
      await admin.query("select pg_stat_statements_reset()");
    }
    log(`${opts.tasks} diamonds, one at a time`);
    commitCalls = 0;
    const walBefore = await walLsn(sm.db.pool);
    for (let i = 0; i < opts.tasks; i++) {
      const started = performance.now();
      const { task } = await broker.submit({ namespace: "bench", name: "diamond", context: { n: i } });
      await broker.wait(task.task_id, 10_000);
      diamonds.push(performance.now() - started);
    }
    commitsPerDiamond = commitCalls / opts.tasks;
    walPerCommit = (await walBytesSince(sm.db.pool, walBefore)) / commitCalls;
    if (admin) {
      const { rows } = await admin.query<{ query: string; calls: string; mean: number }>(
        `select regexp_replace(query, '\\s+', ' ', 'g') as query, calls, mean_exec_time as mean
           from pg_stat_statements order by total_exec_time desc limit 12`,
      );
      statements = rows.map((r) => ({
        query: r.query.slice(0, 110),
        calls: Number(r.calls),
        meanMs: Math.round(r.mean * 1000) / 1000,
      }));
    }
  } finally {
    await admin?.end();
    await stop();
    unwatch();
  }
  // For each child, the parent that finished last (the one whose commit readied it).
  const { rows } = await sm.db.pool.query<{
    step_id: string;
    finished: number;
    committed: number | null;
    received: number;
    arrived: number;
  }>(
    `select distinct on (c.id) c.id::text as step_id,
            extract(epoch from p.finished_at) * 1000 as finished,
            extract(epoch from pg_xact_commit_timestamp(p.xmin)) * 1000 as committed,
            (c.output->>'received_at')::float8 as received,
            (c.output->>'arrived_at')::float8 as arrived
       from steps c join step_edges e on e.child_id = c.id join steps p on p.id = e.parent_id
      where c.state = 'complete'
      order by c.id, p.finished_at desc`,
  );
  await sm.close();
  await dropBenchSchema(opts.url, SCHEMA);

  const seg: Record<string, number[]> = {
    "total (the bench's figure)": [],
    "in PostgreSQL (finished_at -> commit record)": [],
    "flush + reply (commit record -> rows in broker)": [],
    "broker (rows -> STEP handed to zeromq)": [],
    "zeromq + tcp (handed -> pool received)": [],
    "pool (received -> handler runs)": [],
  };
  const [total, inPg, flush, inBroker, wire, inPool] = Object.values(seg) as number[][];
  let claimedByCommit = 0;
  const claimedLater: number[] = [];
  // The server's times moved onto this process's clock.
  const off = floor.clockOffsetMs;
  for (const r of rows) {
    total!.push(Number(r.arrived) - Number(r.finished));
    const finished = Number(r.finished) + off;
    const c = commits.get(r.step_id);
    const handed = handedAt.get(r.step_id);
    if (!c || handed === undefined || r.committed === null) {
      claimedLater.push(Math.round((Number(r.arrived) - Number(r.finished)) * 10) / 10);
      continue;
    }
    claimedByCommit++;
    const committed = Number(r.committed) + off;
    inPg!.push(committed - finished);
    flush!.push(c.rowsAt - committed);
    inBroker!.push(handed - c.rowsAt);
    wire!.push(Number(r.received) - handed);
    inPool!.push(Number(r.arrived) - Number(r.received));
  }
  return {
    children: rows.length,
    claimedByCommit,
    claimedLaterMs: claimedLater.sort((a, b) => a - b),
    commitsPerDiamond: Math.round((commitsPerDiamond ?? NaN) * 100) / 100,
    diamondMs: summary(diamonds),
    walBytesPerCommit: Math.round(walPerCommit ?? NaN),
    segments: Object.fromEntries(Object.entries(seg).map(([k, v]) => [k, summary(v)])),
    floor: floor.floor,
    settings: floor.settings,
    clockOffsetMs: floor.clockOffsetMs,
    ...(statements ? { statements } : {}),
  };
}

/** The pool process: `stamp` returns when its STEP left the socket and when the handler ran. */
async function runPool(endpoint: string): Promise<void> {
  let receivedAt = 0;
  const proto = zmq.Dealer.prototype as { receive: zmq.Dealer["receive"] };
  const receive = proto.receive;
  patch(proto, "receive", async function (this: zmq.Dealer) {
    const frames = await receive.call(this);
    receivedAt = wall();
    return frames;
  });
  const pool = new HandlerPool({
    endpoint,
    capacity: 256,
    poolId: `latency-${process.pid}`,
    logger: pino({ level: "warn" }),
  });
  pool.handle("stamp", async () => ({ arrived_at: wall(), received_at: receivedAt }));
  await pool.start();
  process.stdout.write(`READY ${pool.poolId}\n`);
  const stop = () => void pool.close({ drainMs: 1000 });
  process.once("SIGTERM", stop);
  process.once("SIGINT", stop);
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  const { values } = parseArgs({
    options: {
      pool: { type: "string" },
      tasks: { type: "string", default: "100" },
      commits: { type: "string", default: "500" },
      json: { type: "boolean" },
      // Diagnostic only: how much of "flush + reply" is the WAL flush. Never how stepbroker runs.
      "async-commit": { type: "boolean" },
      // Diagnostic only: pg_stat_statements (nested statements too) splits the time in PostgreSQL.
      statements: { type: "boolean" },
    },
  });
  if (values.pool !== undefined) {
    await runPool(values.pool);
  } else {
    const log = (line: string) => process.stderr.write(`childLatency: ${line}\n`);
    const flags = ["-c", "track_commit_timestamp=on"];
    if (values["async-commit"]) flags.push("-c", "synchronous_commit=off");
    if (values.statements)
      flags.push("-c", "shared_preload_libraries=pg_stat_statements", "-c", "pg_stat_statements.track=all");
    const db = await openBenchDatabase(log, undefined, flags);
    try {
      const r = await measureChildLatency({
        url: db.url,
        tasks: Number(values.tasks),
        commits: Number(values.commits),
        ...(values.statements && db.server ? { adminUrl: db.server.adminUrl } : {}),
        log,
      });
      if (values.json) process.stdout.write(`${JSON.stringify(r)}\n`);
      else {
        const f = (n: number) => n.toFixed(3).padStart(9);
        const lines = [
          `segment                                           p50 ms    p99 ms`,
          ...Object.entries(r.segments).map(([k, v]) => `${k.padEnd(48)} ${f(v.p50)} ${f(v.p99)}`),
          `${r.claimedByCommit} of ${r.children} children claimed by their parents' commit (the split covers those);` +
            ` the others, ms: [${r.claimedLaterMs.join(", ")}]`,
          `${r.commitsPerDiamond} commits per diamond; SUBMIT -> task ended ${f(r.diamondMs.p50)} ${f(r.diamondMs.p99)}`,
          `floor: durable single-row INSERT ${f(r.floor.commitP50)} ${f(r.floor.commitP99)}` +
            `  (WAL per commit: ${r.floor.walBytesPerCommit} bytes; during the diamonds, per result commit: ${r.walBytesPerCommit})`,
          `       select round trip         ${f(r.floor.roundTripP50)} ${f(r.floor.roundTripP99)}`,
          `server: ${Object.entries(r.settings)
            .map(([k, v]) => `${k}=${v}`)
            .join(", ")}; clock offset ${r.clockOffsetMs.toFixed(3)} ms`,
          ...(r.statements ?? []).map(
            (q) => `${f(q.meanMs)} ms x ${String(q.calls).padStart(5)}  ${q.query}`,
          ),
        ];
        process.stdout.write(`${lines.join("\n")}\n`);
      }
    } finally {
      await db.close();
    }
  }
}
