/**
 * How far the end-to-end one-step figure is from what the database alone can
 * do on this machine, and how much the data model itself costs. Every
 * measurement works through one-step tasks created up front, on two
 * connections at once (the broker overlaps claims and completions the same
 * way), in batches of the pool's capacity, with no broker, no sockets and no
 * pool:
 *
 * - the write floors (./floorModels.ts): only the rows each one-step task must
 *   write, as two bare statements, in tables each model creates for itself in
 *   a schema of its own: the pre-0013 model (floor_before) beside the
 *   insert-only, partitioned one (floor_new) and two of its variants;
 * - "state manager": StateManager.claimSteps + completeAttempts, the SQL the
 *   broker runs, on whatever tables the migrations in sql/ make.
 *
 * All of them run in each round, in an order rotated from round to round, so a
 * shared machine's load falls on each alike; the rows are each one's median.
 * Each phase starts from a CHECKPOINT and reports, beside its rate, the WAL it
 * wrote per task (pg_current_wal_lsn before and after: the same figure on a
 * busy machine as on a quiet one) and the share of its steps updates that
 * were HOT (pg_stat_user_tables).
 *
 *   node --import tsx bench/floor.ts [--tasks 60000] [--capacity 2048] [--seconds 30] [--rounds 1]
 * (run.ts calls measureFloor; run alone it uses DATABASE_URL, or an embedded server.)
 */
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import pg from "pg";
import { connectionConfig } from "../broker/db/openDatabase";
import type { StateManager } from "../broker/state/StateManager";
import { startFromCheckpoint } from "./checkpoint";
import { type FloorModel, type FloorModelName, floorModels } from "./floorModels";
import { createTasksInBatches, dropBenchSchema, openBenchDatabase, openBenchState } from "./harness";

const STATE_SCHEMA = "bench_floor";
const CONNECTIONS = 2;
/** Tasks per fill statement: one transaction each, so the fill needs no more memory for 60,000 tasks than for 6,000. */
const FILL_CHUNK = 20_000;
/** The model schemas call new_id(), as the broker does: the same time-ordered ids, from the project's own definition. */
const NEW_ID_SQL = readFileSync(new URL("../sql/functions/new_id.sql", import.meta.url), "utf8");

export interface FloorPhase {
  steps: number;
  seconds: number;
  stepsPerSecond: number;
  /** True when the bound ended the phase before every task was done. */
  timedOut: boolean;
  /** WAL bytes the phase wrote, per step (the whole server's WAL: nothing else should run). */
  walBytesPerStep?: number;
  /** n_tup_hot_upd / n_tup_upd of the steps table over the phase; undefined when the stats did not arrive. */
  stepsHotRatio?: number;
  /** The same for step_attempts, in the phases that finish an attempt by updating its row. */
  attemptsHotRatio?: number;
}

export interface FloorVariant {
  name: FloorModelName;
  summary: string;
  /** The round whose rate is the median (its WAL and HOT figures come with it). */
  median: FloorPhase;
  /** Every round's phase, in round order. */
  runs: FloorPhase[];
  /** Lowest and highest rate of the rounds. */
  spread: [number, number];
  /** This variant's median rate over floor_before's. */
  ratioToBefore: number;
}

export interface FloorResult {
  tasks: number;
  batch: number;
  connections: number;
  rounds: number;
  /** The write floor of the model as migrated (0013): floor_new's median. */
  writeFloor: FloorPhase;
  stateManager: FloorPhase;
  /** stateManager / writeFloor rate. */
  stateManagerOverFloor: number;
  /** Every model, floor_before first. */
  variants: FloorVariant[];
}

export interface FloorOptions {
  databaseUrl: string;
  tasks: number;
  /** Steps per claim, as the broker claims up to a pool's free credit. */
  batch: number;
  maxSeconds: number;
  /** Rounds of every phase, interleaved. Default 1. */
  rounds?: number;
  log?: (line: string) => void;
}

/** Runs `round` on each connection until it returns 0 or the bound passes; counts what the rounds return. */
async function drain(
  connections: number,
  maxSeconds: number,
  round: () => Promise<number>,
): Promise<FloorPhase> {
  const started = performance.now();
  const deadline = started + maxSeconds * 1000;
  let steps = 0;
  let timedOut = false;
  await Promise.all(
    Array.from({ length: connections }, async () => {
      for (;;) {
        if (performance.now() > deadline) {
          timedOut = true;
          return;
        }
        const n = await round();
        if (n === 0) return;
        steps += n;
      }
    }),
  );
  const seconds = (performance.now() - started) / 1000;
  return {
    steps,
    seconds: Math.round(seconds * 100) / 100,
    stepsPerSecond: Math.round(steps / Math.max(seconds, 1e-3)),
    timedOut,
  };
}

interface Queryable {
  query<R extends pg.QueryResultRow>(sql: string, params?: unknown[]): Promise<pg.QueryResult<R>>;
}

async function walLsn(db: Queryable): Promise<string> {
  const { rows } = await db.query<{ lsn: string }>("select pg_current_wal_lsn()::text as lsn");
  return rows[0]!.lsn;
}

async function walBytesSince(db: Queryable, from: string): Promise<number> {
  const { rows } = await db.query<{ bytes: string }>(
    "select pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)::bigint::text as bytes",
    [from],
  );
  return Number(rows[0]!.bytes);
}

interface UpdateCounts {
  updates: number;
  hot: number;
}

/** A table's update counts, its partitions' summed (named <table>_p<day> and <table>_default). */
async function updateCounts(db: Queryable, schema: string, table: string): Promise<UpdateCounts> {
  // a fresh snapshot of the cumulative statistics, not the one cached earlier in this session
  await db.query("select pg_stat_clear_snapshot()");
  const { rows } = await db.query<{ updates: string; hot: string }>(
    `select coalesce(sum(n_tup_upd), 0)::text as updates, coalesce(sum(n_tup_hot_upd), 0)::text as hot
     from pg_stat_user_tables
     where schemaname = $1 and (relname = $2 or relname = $2 || '_default' or relname like $2 || '\\_p%')`,
    [schema, table],
  );
  return { updates: Number(rows[0]?.updates ?? 0), hot: Number(rows[0]?.hot ?? 0) };
}

/**
 * The share of HOT updates of `table` since `before`. Backends report their counts when they exit
 * (the phase's pool is closed by now) or at most a second after a transaction; waits, bounded,
 * until `expected` updates are counted.
 */
async function hotRatio(
  db: Queryable,
  schema: string,
  table: string,
  before: UpdateCounts,
  expected: number,
): Promise<number | undefined> {
  const deadline = performance.now() + 15_000;
  for (;;) {
    const now = await updateCounts(db, schema, table);
    const updates = now.updates - before.updates;
    if (updates >= expected || performance.now() > deadline) {
      return updates > 0 ? Math.round(((now.hot - before.hot) / updates) * 1000) / 1000 : undefined;
    }
    await new Promise((r) => setTimeout(r, 200));
  }
}

/**
 * The WAL and HOT figures around one phase run on `pool` (closed here: its backends must exit for
 * their statistics to be reported), measured from `observer`, a connection of its own.
 */
async function observed(
  observer: Queryable,
  schema: string,
  log: (line: string) => void,
  run: () => Promise<FloorPhase>,
  closePool: () => Promise<void>,
): Promise<FloorPhase> {
  await startFromCheckpoint(observer, log);
  const stepsBefore = await updateCounts(observer, schema, "steps");
  const attemptsBefore = await updateCounts(observer, schema, "step_attempts");
  const lsn = await walLsn(observer);
  let phase: FloorPhase;
  try {
    phase = await run();
  } finally {
    await closePool();
  }
  const wal = await walBytesSince(observer, lsn);
  // two updates of each finished step (claim, result); the attempts' counts (where a model updates
  // them at all) come from the same backends' exit reports, so they are in once the steps' are
  const steps = await hotRatio(observer, schema, "steps", stepsBefore, phase.steps * 2);
  const attempts = await hotRatio(observer, schema, "step_attempts", attemptsBefore, 0);
  return {
    ...phase,
    walBytesPerStep: Math.round(wal / Math.max(phase.steps, 1)),
    ...(steps !== undefined ? { stepsHotRatio: steps } : {}),
    ...(attempts !== undefined ? { attemptsHotRatio: attempts } : {}),
  };
}

/**
 * A floor that wrote less than a one-step task needs would flatter itself: after a full drain,
 * every task and step is complete, with one finished attempt and three transitions each (created,
 * claimed or started, completed), and the latest transition of each says "complete".
 */
async function checkWrites(db: Queryable, model: FloorModel, tasks: number): Promise<void> {
  const { rows } = await db.query<Record<string, number>>(
    `select (select count(*)::int from tasks where state = 'complete') as tasks,
            (select count(*)::int from steps where state = 'complete' and lease_attempt_id is null) as steps,
            (select count(*)::int from step_attempts where outcome = 'complete' and finished_at is not null) as attempts,
            (select count(*)::int from step_transitions) as step_transitions,
            (select count(*)::int from task_transitions) as task_transitions,
            (select count(*)::int from step_transitions where sort_key = 3 and to_state = 'complete') as steps_last,
            (select count(*)::int from task_transitions where sort_key = 3 and to_state = 'complete') as tasks_last`,
  );
  const got = rows[0]!;
  const want: Record<string, number> = {
    tasks,
    steps: tasks,
    attempts: tasks,
    step_transitions: 3 * tasks,
    task_transitions: 3 * tasks,
    steps_last: tasks,
    tasks_last: tasks,
  };
  const wrong = Object.keys(want).filter((k) => got[k] !== want[k]);
  if (wrong.length > 0)
    throw new Error(
      `${model.name} wrote other rows than ${tasks} one-step tasks need: ` +
        wrong.map((k) => `${k} ${got[k]} (want ${want[k]})`).join(", "),
    );
}

/** One round of one model: its schema made, filled, drained and dropped. */
async function runModel(
  url: string,
  model: FloorModel,
  opts: FloorOptions,
  log: (line: string) => void,
): Promise<FloorPhase> {
  const schema = `bench_${model.name}`;
  await dropBenchSchema(url, schema);
  const admin = new pg.Client({ connectionString: url });
  await admin.connect();
  const pool = new pg.Pool({ ...connectionConfig(url, schema), max: CONNECTIONS });
  let poolOpen = true;
  const closePool = async (): Promise<void> => {
    if (poolOpen) await pool.end();
    poolOpen = false;
  };
  try {
    await admin.query(`create schema ${schema}`);
    await admin.query(`set search_path = ${schema}`);
    await admin.query(NEW_ID_SQL);
    await admin.query(model.ddl);
    for (let made = 0; made < opts.tasks; made += FILL_CHUNK) {
      await admin.query(model.fill, [Math.min(FILL_CHUNK, opts.tasks - made)]);
    }
    await admin.query("vacuum analyze tasks, steps, step_attempts, step_transitions, task_transitions");
    if (model.name === "floor_new_ready_queue") await admin.query("vacuum analyze step_queue");

    const phase = await observed(
      admin,
      schema,
      log,
      () =>
        drain(CONNECTIONS, opts.maxSeconds, async () => {
          const claimed = await pool.query<{ step_ids: string[] | null; attempt_ids: string[] | null }>(
            model.claim,
            [opts.batch],
          );
          const steps = claimed.rows[0]?.step_ids ?? [];
          const attempts = claimed.rows[0]?.attempt_ids ?? [];
          if (attempts.length === 0) return 0;
          const params = model.completeTakes === "attempts" ? [attempts] : [steps, attempts];
          const stored = await pool.query<{ stored: number }>(model.complete, params);
          return stored.rows[0]?.stored ?? 0;
        }),
      closePool,
    );
    if (!phase.timedOut) await checkWrites(admin, model, opts.tasks);
    return phase;
  } finally {
    await closePool();
    await admin.query(`drop schema if exists ${schema} cascade`).catch(() => undefined);
    await admin.end();
  }
}

/** One round of the real state manager, on a freshly migrated schema. */
async function runStateManager(opts: FloorOptions, log: (line: string) => void): Promise<FloorPhase> {
  const sm: StateManager = await openBenchState(opts.databaseUrl, STATE_SCHEMA);
  let open = true;
  const close = async (): Promise<void> => {
    if (open) await sm.close();
    open = false;
  };
  const observer = new pg.Client({ connectionString: opts.databaseUrl });
  await observer.connect();
  try {
    await sm.registerTemplate({
      namespace: "bench",
      name: "floor",
      version: "1",
      steps: [{ name: "s", handler: "noop" }],
    });
    await createTasksInBatches(sm, opts.tasks, "bench", "floor");
    return await observed(
      observer,
      STATE_SCHEMA,
      log,
      () =>
        drain(CONNECTIONS, opts.maxSeconds, async () => {
          const claimed = await sm.claimSteps({ brokerId: "bench", handlers: ["noop"], limit: opts.batch });
          if (claimed.length === 0) return 0;
          const { outcomes } = await sm.completeAttempts(
            claimed.map((c) => ({ attemptId: c.attempt_id, status: "complete" as const, output: {} })),
          );
          return outcomes.filter((o) => o.outcome === "stored").length;
        }),
      close,
    );
  } finally {
    await close();
    await observer.end();
    await dropBenchSchema(opts.databaseUrl, STATE_SCHEMA);
  }
}

function medianPhase(runs: FloorPhase[]): FloorPhase {
  const sorted = [...runs].sort((a, b) => a.stepsPerSecond - b.stepsPerSecond);
  return sorted[Math.floor(sorted.length / 2)]!;
}

function ratio(a: number, b: number): number {
  return Math.round((a / Math.max(b, 1)) * 100) / 100;
}

export async function measureFloor(opts: FloorOptions): Promise<FloorResult> {
  const log = opts.log ?? (() => undefined);
  const rounds = opts.rounds ?? 1;
  const phases = [...floorModels.map((m) => m.name), "state manager"] as const;
  const runs = new Map<string, FloorPhase[]>(phases.map((p) => [p, []]));
  for (let round = 0; round < rounds; round++) {
    // rotated each round, so no phase always runs first (or right after the heaviest)
    const order = phases.map((_, i) => phases[(i + round) % phases.length]!);
    for (const name of order) {
      const model = floorModels.find((m) => m.name === name);
      log(
        `${name}, round ${round + 1}/${rounds}: ${opts.tasks} one-step tasks, ${CONNECTIONS} connections, batches of ${opts.batch}` +
          (model ? "" : ", claimSteps + completeAttempts"),
      );
      const phase = model
        ? await runModel(opts.databaseUrl, model, opts, log)
        : await runStateManager(opts, log);
      log(`${name}: ${phase.stepsPerSecond} steps/s, ${phase.walBytesPerStep} WAL bytes per task`);
      runs.get(name)!.push(phase);
    }
  }
  const before = medianPhase(runs.get("floor_before")!);
  const variants = floorModels.map((m): FloorVariant => {
    const all = runs.get(m.name)!;
    const median = medianPhase(all);
    const rates = all.map((p) => p.stepsPerSecond);
    return {
      name: m.name,
      summary: m.summary,
      median,
      runs: all,
      spread: [Math.min(...rates), Math.max(...rates)],
      ratioToBefore: ratio(median.stepsPerSecond, before.stepsPerSecond),
    };
  });
  const writeFloor = variants.find((v) => v.name === "floor_new")!.median;
  const stateManager = medianPhase(runs.get("state manager")!);
  return {
    tasks: opts.tasks,
    batch: opts.batch,
    connections: CONNECTIONS,
    rounds,
    writeFloor,
    stateManager,
    stateManagerOverFloor: ratio(stateManager.stepsPerSecond, writeFloor.stepsPerSecond),
    variants,
  };
}

/** WAL per task and the steps' HOT share, for a row's notes. */
export function phaseCosts(p: FloorPhase): string {
  const pct = (r: number | undefined, what: string): string =>
    r !== undefined ? `, ${what} HOT ${Math.round(r * 100)}%` : "";
  return `${p.walBytesPerStep ?? "?"} WAL bytes/task${pct(p.stepsHotRatio, "steps")}${pct(p.attemptsHotRatio, "attempts")}`;
}

export function formatFloor(f: FloorResult): string {
  const lines = f.variants.map(
    (v) =>
      `${v.name.padEnd(27)} ${String(v.median.stepsPerSecond).padStart(6)} tasks/s  ${v.ratioToBefore.toFixed(2)}x of floor_before  ` +
      `${phaseCosts(v.median)}${v.runs.length > 1 ? `  (spread ${v.spread[0]}-${v.spread[1]})` : ""}  ${v.summary}`,
  );
  lines.push(
    `${"state manager".padEnd(27)} ${String(f.stateManager.stepsPerSecond).padStart(6)} tasks/s  ` +
      `${f.stateManagerOverFloor.toFixed(2)}x of floor_new  ${phaseCosts(f.stateManager)}  claimSteps + completeAttempts on the migrated schema`,
  );
  lines.push(
    `(${f.tasks} one-step tasks each, ${f.connections} connections, batches of ${f.batch}, no sockets, ` +
      `median of ${f.rounds} interleaved round${f.rounds === 1 ? "" : "s"})`,
  );
  return lines.join("\n");
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  const { values } = parseArgs({
    options: {
      tasks: { type: "string" },
      capacity: { type: "string" },
      seconds: { type: "string" },
      rounds: { type: "string" },
    },
  });
  const log = (line: string) => process.stderr.write(`floor: ${line}\n`);
  const database = await openBenchDatabase(log);
  try {
    const result = await measureFloor({
      databaseUrl: database.url,
      tasks: Number(values.tasks ?? 60_000),
      batch: Number(values.capacity ?? 2048),
      maxSeconds: Number(values.seconds ?? 30),
      rounds: Number(values.rounds ?? 1),
      log,
    });
    process.stdout.write(`${formatFloor(result)}\n`);
  } finally {
    await database.close();
  }
}
