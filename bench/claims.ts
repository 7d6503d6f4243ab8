/**
 * Claim speed against history: claimSteps + completeAttempts (batch 100) on
 * ~20k ready one-step tasks, first in a schema with no history, then again in
 * one that holds millions of finished steps (the issue's target: 10,000,000,
 * at least 0.95x of empty). Dispatch reads the ready steps (a partial index,
 * or whatever the migrations make it) and reaches everything else by key, so
 * the two figures should be close: cost follows ready work, not history.
 *
 * The history is made the way real history looks: a handful of tasks finish
 * through the real StateManager first, and one of them is the model that
 * set-based INSERT ... SELECT FROM generate_series statements copy into every
 * table that holds rows of it. The statements are written at run time from
 * the catalog (every column the tables have, but identity and generated ones),
 * so they follow the migrations without edits: new ids (time-ordered, as the
 * broker's are), timestamps spread over the 30 days before the build, and
 * every other value as the model has it. Copying a real finished task keeps
 * the copies within every constraint and in step with whatever the SQL writes.
 * A time-partitioned table gets the daily partitions the copies need, where
 * none covers a day yet; rows are inserted through the parent.
 *
 * A history can be kept (`keepHistory`, as `npm run bench` does for its full
 * run): its schema is named after its size and a hash of sql/migrations,
 * records how far its build got, and is reused as it is, or its build
 * resumed, by every later run on the same server, so the ten million are
 * built once per machine (and again after a new migration).
 * Both phases always run on the same server.
 *
 *   node --import tsx bench/claims.ts [--history 1000000] [--ready 20000] [--seconds 15] [--no-keep]
 *     [--history-seconds 3600] [--rounds 1]
 * Both phases run after the history is ready (the model task is one of a handful finished first),
 * in --rounds interleaved rounds, so a long build's load does not fall on one of them only.
 * (run.ts calls measureClaims; run alone it keeps the history in openCachedBenchDatabase's server,
 *  or with --no-keep builds it in a throwaway one.)
 */
import { createHash } from "node:crypto";
import { readdirSync, readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";
import pg from "pg";
import { openDatabase } from "../broker/db/openDatabase";
import { StateManager } from "../broker/state/StateManager";
import { startFromCheckpoint } from "./checkpoint";
import { type CopiedTable, HISTORY_DAYS, copiedTables, copyStatement } from "./copyStatement";
import { boundLegacyPartitions, createDailyPartitions, startOfDay } from "./createDailyPartitions";

const EMPTY_SCHEMA = "bench_claims_empty";
/** The history schema of a run that does not keep it. */
const THROWAWAY_SCHEMA = "bench_claims_history";
const BROKER_ID = "bench-claims";
const HANDLER = "noop";
const BATCH = 100;
/** Copies per INSERT statement (one transaction each): big enough to be set-based, small enough to stop near a deadline. */
const HISTORY_CHUNK = 50_000;

export interface ClaimPhase {
  /** Finished steps in the schema when the phase started. */
  historySteps: number;
  /** Ready one-step tasks when the phase started: those created for it, and any an earlier round's bound left. */
  readySteps: number;
  /** Steps claimed and completed within the bound. */
  completed: number;
  seconds: number;
  stepsPerSecond: number;
  /** Mean milliseconds of one claimSteps(limit 100) call. */
  claimMs: number;
  /** Mean milliseconds of one completeAttempts(100 results) call. */
  completeMs: number;
  /** True when the bound ended the phase before every ready step was done. */
  timedOut: boolean;
}

export interface ClaimsResult {
  batch: number;
  /** Rounds of both phases, interleaved; empty and withHistory are each one's median round. */
  rounds: number;
  empty: ClaimPhase;
  withHistory: ClaimPhase;
  /** Every round's rate, in round order. */
  emptyRuns: number[];
  withHistoryRuns: number[];
  /** Finished steps this run inserted (0 when a kept history was complete; less than asked when the bound hit). */
  historyInserted: number;
  historySeconds: number;
  /** The history asked for, and whether it came from a kept schema (built or resumed earlier). */
  historyTarget: number;
  historyKept: boolean;
  historyReused: boolean;
  /** The history schema's size on disk (tables, indexes, TOAST), in bytes. */
  historyBytes: number;
  /** withHistory / empty throughput. */
  ratio: number;
}

export interface ClaimsOptions {
  databaseUrl: string;
  /** Ready one-step tasks per phase. Default 20,000. */
  ready?: number;
  /** Finished steps the history phase runs beside. Default 1,000,000. */
  history?: number;
  /** Keep the history schema and reuse it (or resume its build) on later runs. Default false. */
  keepHistory?: boolean;
  /** Bound on each measured phase, in seconds. */
  maxSeconds: number;
  /** Rounds of both phases, interleaved, after the history is ready. Default 1. */
  rounds?: number;
  /** Bound on this run's history inserts, in seconds. Default 300. */
  historyMaxSeconds?: number;
  log?: (line: string) => void;
}

const TEMPLATE = {
  namespace: "bench",
  name: "claims",
  version: "1",
  steps: [{ name: "work", handler: HANDLER }],
};

/**
 * How a build lays its copies out beyond what the migrations make; part of the fingerprint, so a
 * build made another way is not reused. Builds before this one put every copy in `_legacy`, and
 * left a one-row slack on every page of steps (see packDensely).
 */
const HISTORY_LAYOUT = `day partitions over ${HISTORY_DAYS} days, _legacy bounded before them; steps and tasks packed`;

/**
 * A short hash of every migration and of the build's layout: a kept history is valid only for the tables it was built in.
 * Functions are not part of it: the claims run migrates the kept schema, which applies every
 * changed function body, so a change to the SQL the claim runs does not cost a rebuild.
 */
export function schemaFingerprint(): string {
  const hash = createHash("sha256");
  hash.update(`layout: ${HISTORY_LAYOUT}\n`);
  for (const dir of ["migrations"]) {
    const url = new URL(`../sql/${dir}/`, import.meta.url);
    for (const file of readdirSync(url).sort()) {
      if (!file.endsWith(".sql")) continue;
      hash.update(`${dir}/${file}\n`);
      hash.update(readFileSync(new URL(file, url)));
    }
  }
  return hash.digest("hex").slice(0, 10);
}

async function withClient<T>(url: string, run: (c: pg.Client) => Promise<T>): Promise<T> {
  const c = new pg.Client({ connectionString: url });
  c.on("error", () => undefined);
  await c.connect();
  try {
    return await run(c);
  } finally {
    await c.end();
  }
}

async function dropSchema(url: string, schema: string): Promise<void> {
  await withClient(url, (c) => c.query(`drop schema if exists ${schema} cascade`));
}

async function openSchema(url: string, schema: string): Promise<StateManager> {
  const sm = new StateManager(await openDatabase({ databaseUrl: url, schema, poolSize: 2 }));
  await sm.migrate();
  return sm;
}

async function countFinishedSteps(sm: StateManager): Promise<number> {
  const { rows } = await sm.db.pool.query<{ n: number }>(
    `select count(*)::int as n from steps where state = 'complete'`,
  );
  return rows[0]?.n ?? 0;
}

async function createReady(sm: StateManager, n: number, offset: number): Promise<void> {
  for (let made = 0; made < n; made += 5000) {
    const k = Math.min(5000, n - made);
    await sm.createTasks(
      Array.from({ length: k }, (_, i) => ({
        namespace: TEMPLATE.namespace,
        name: TEMPLATE.name,
        context: { n: offset + made + i },
      })),
    );
  }
}

/** Claims and completes in batches until no ready step is left or the bound passes. */
async function drain(
  sm: StateManager,
  ready: number,
  historySteps: number,
  maxSeconds: number,
): Promise<ClaimPhase> {
  const started = performance.now();
  const deadline = started + maxSeconds * 1000;
  let completed = 0;
  let rounds = 0;
  let claimMs = 0;
  let completeMs = 0;
  let timedOut = false;
  for (;;) {
    if (performance.now() >= deadline) {
      timedOut = true;
      break;
    }
    const t0 = performance.now();
    const claimed = await sm.claimSteps({ brokerId: BROKER_ID, handlers: [HANDLER], limit: BATCH });
    const t1 = performance.now();
    claimMs += t1 - t0;
    if (claimed.length === 0) break;
    const { outcomes } = await sm.completeAttempts(
      claimed.map((c) => ({
        attemptId: c.attempt_id,
        status: "complete" as const,
        output: { ok: true },
        poolId: "bench",
        durationMs: 0.1,
      })),
    );
    completeMs += performance.now() - t1;
    completed += outcomes.filter((o) => o.outcome === "stored").length;
    rounds++;
  }
  const seconds = (performance.now() - started) / 1000;
  return {
    historySteps,
    readySteps: ready,
    completed,
    seconds: Math.round(seconds * 100) / 100,
    stepsPerSecond: Math.round(completed / Math.max(seconds, 1e-3)),
    claimMs: Math.round((claimMs / Math.max(rounds, 1)) * 100) / 100,
    completeMs: Math.round((completeMs / Math.max(rounds, 1)) * 100) / 100,
    timedOut,
  };
}

// ------------------------------------------------------------------ the copy

/** A finished task with exactly one step, complete after one attempt: the model the history copies. */
async function pickModel(sm: StateManager): Promise<string> {
  const { rows } = await sm.db.pool.query<{ id: string }>(
    `select t.id from tasks t
     where t.state = 'complete'
       and (select count(*) from steps s where s.task_id = t.id and s.state = 'complete' and s.attempts = 1) = 1
       and (select count(*) from steps s where s.task_id = t.id) = 1
       and (select count(*) from step_attempts a join steps s on s.id = a.step_id
            where s.task_id = t.id and a.outcome = 'complete') = 1
       and (select count(*) from step_attempts a join steps s on s.id = a.step_id where s.task_id = t.id) = 1
     order by t.finished_at limit 1`,
  );
  const id = rows[0]?.id;
  if (id === undefined)
    throw new Error("no finished one-step task to copy the history from (did the model tasks complete?)");
  return id;
}

/**
 * How far a history schema's build got: the target and the time the copies spread back from, and
 * one row per chunk of copies, inserted in that chunk's own transaction (so a build stopped by its
 * bound, or killed, resumes with exactly the chunks that are missing).
 */
const PROGRESS_DDL = `
create table if not exists bench_history_progress (
  target bigint not null, anchor timestamptz not null, fingerprint text not null,
  done boolean not null default false);
create table if not exists bench_history_chunks (first bigint primary key, n integer not null)`;

interface Progress {
  target: number;
  inserted: number;
  anchor: Date;
  done: boolean;
}

async function readProgress(c: pg.Client, schema: string): Promise<Progress | undefined> {
  const exists = await c.query(
    `select 1 from pg_tables where schemaname = $1 and tablename = 'bench_history_progress'`,
    [schema],
  );
  if (exists.rowCount === 0) return undefined;
  const { rows } = await c.query<{ target: string; inserted: string; anchor: Date; done: boolean }>(
    `select target::text, (select coalesce(sum(n), 0) from ${schema}.bench_history_chunks)::text as inserted,
            anchor, done
     from ${schema}.bench_history_progress`,
  );
  const r = rows[0];
  return r && { target: Number(r.target), inserted: Number(r.inserted), anchor: r.anchor, done: r.done };
}

/** Copies inserted at once: both cores, as the database has two. */
const HISTORY_WORKERS = 2;

/**
 * The copies fill the pages of the plain (unpartitioned) tables whole. At the tables' own
 * fillfactor (steps 70, tasks 50) each page of copies kept its reserve plus a slack just short of
 * one more finished row, and a new ready step, smaller than a finished one, fits that slack: the
 * free space map handed out one such page per insert, so every ready step of a measured phase lay
 * on a page of its own among the history's (2,000 ready steps on 2,000 pages, against 129 in an
 * empty schema), each claim read and dirtied 100 cold pages, and wrote a full-page image of each
 * after a checkpoint. History written step by step leaves its pages full of finished rows; new
 * work goes to the pages vacuum freed and to the end. The migrations' fillfactor comes back when
 * the build is done, for the rows written from then on.
 */
async function packDensely(c: pg.Client, target: string, tables: CopiedTable[]): Promise<void> {
  const { rows } = await c.query<{ name: string }>(
    `select cl.relname as name from pg_class cl join pg_namespace n on n.oid = cl.relnamespace
     where n.nspname = $1 and cl.relkind = 'r' and cl.relname = any($2)`,
    [target, tables.map((t) => t.name)],
  );
  for (const { name } of rows)
    await c.query(`alter table ${target}.${pg.escapeIdentifier(name)} set (fillfactor = 100)`);
}

/** Each packed table's fillfactor as the migrations set it, read from the (freshly migrated) source. */
async function restoreFillfactors(c: pg.Client, source: string, target: string): Promise<void> {
  const { rows } = await c.query<{ name: string; fillfactor: string | null }>(
    `select t.relname as name,
            (select substr(o, 12) from unnest(s.reloptions) o where o like 'fillfactor=%') as fillfactor
     from pg_class t join pg_namespace tn on tn.oid = t.relnamespace
     join pg_class s on s.relname = t.relname
     join pg_namespace sn on sn.oid = s.relnamespace and sn.nspname = $2
     where tn.nspname = $1 and t.relkind = 'r' and 'fillfactor=100' = any(t.reloptions)`,
    [target, source],
  );
  for (const { name, fillfactor } of rows) {
    const table = `${target}.${pg.escapeIdentifier(name)}`;
    await c.query(
      fillfactor === null
        ? `alter table ${table} reset (fillfactor)`
        : `alter table ${table} set (fillfactor = ${Number(fillfactor)})`,
    );
  }
}

/** Inserts the chunks of copies still missing, on HISTORY_WORKERS connections, until done or the bound. */
async function insertHistory(
  url: string,
  source: string,
  target: string,
  model: string,
  templateId: number,
  progress: Progress,
  maxSeconds: number,
  log: (line: string) => void,
): Promise<{ inserted: number; seconds: number }> {
  const started = performance.now();
  const deadline = started + maxSeconds * 1000;
  let inserted = 0;
  let lastLog = started;
  const { sql, missing } = await withClient(url, async (c) => {
    const tables = await copiedTables(c, target);
    log(`claims: copying into ${tables.map((t) => `${t.name} (${t.columns.length} columns)`).join(", ")}`);
    const { rows } = await c.query<{ v: number }>("select current_setting('server_version_num')::int as v");
    const partitions = await createDailyPartitions(
      c,
      target,
      startOfDay(progress.anchor, -HISTORY_DAYS - 1),
      startOfDay(progress.anchor, 2),
    );
    if (partitions > 0) log(`claims: created ${partitions} daily partitions for the history`);
    await packDensely(c, target, tables);
    const done = await c.query<{ first: string }>(`select first::text from ${target}.bench_history_chunks`);
    const have = new Set(done.rows.map((r) => Number(r.first)));
    const todo: number[] = [];
    for (let first = 1; first <= progress.target; first += HISTORY_CHUNK)
      if (!have.has(first)) todo.push(first);
    return {
      sql: copyStatement(source, target, tables, progress.target, (rows[0]?.v ?? 0) >= 180000),
      missing: todo,
    };
  });
  let boundHit = false;
  await Promise.all(
    Array.from({ length: HISTORY_WORKERS }, () =>
      withClient(url, async (c) => {
        for (let first = missing.shift(); first !== undefined; first = missing.shift()) {
          if (performance.now() >= deadline) {
            boundHit = true;
            return;
          }
          const n = Math.min(HISTORY_CHUNK, progress.target - first + 1);
          await c.query("begin");
          try {
            // setup only: a crash loses at most the chunks not yet flushed, and their rows in
            // bench_history_chunks with them; the measured phases commit durably as usual
            await c.query("set local synchronous_commit = off");
            await c.query(sql, [model, first, first + n - 1, templateId, progress.anchor]);
            await c.query(`insert into ${target}.bench_history_chunks (first, n) values ($1, $2)`, [
              first,
              n,
            ]);
            await c.query("commit");
          } catch (err) {
            await c.query("rollback").catch(() => undefined);
            throw err;
          }
          inserted += n;
          progress.inserted += n;
          if (performance.now() - lastLog >= 10_000) {
            lastLog = performance.now();
            const s = (lastLog - started) / 1000;
            log(
              `claims: ${progress.inserted}/${progress.target} finished steps after ${s.toFixed(0)}s (${Math.round(inserted / s)}/s)`,
            );
          }
        }
      }),
    ),
  );
  if (boundHit)
    log(
      `claims: history bound of ${maxSeconds}s hit at ${progress.inserted} finished steps; a later run resumes`,
    );
  progress.done = progress.inserted >= progress.target;
  if (progress.done)
    await withClient(url, async (c) => {
      await restoreFillfactors(c, source, target);
      await c.query(`update ${target}.bench_history_progress set done = true`);
    });
  return { inserted, seconds: Math.round(((performance.now() - started) / 1000) * 100) / 100 };
}

async function schemaBytes(url: string, schema: string): Promise<number> {
  return withClient(url, async (c) => {
    const { rows } = await c.query<{ bytes: string }>(
      `select coalesce(sum(pg_total_relation_size(cl.oid)), 0)::bigint::text as bytes
       from pg_class cl join pg_namespace n on n.oid = cl.relnamespace
       where n.nspname = $1 and cl.relkind in ('r', 'm')`,
      [schema],
    );
    return Number(rows[0]?.bytes ?? 0);
  });
}

/**
 * The history schema, made ready to measure beside: reused if kept and complete, else built (or
 * its build resumed) from the model task in `source`. A kept schema is named after its size and the
 * migrations' fingerprint; a kept schema of the same size for other migrations is dropped first,
 * so one machine holds one such history at a time.
 */
async function prepareHistory(
  opts: ClaimsOptions,
  source: string,
  model: string,
  log: (line: string) => void,
): Promise<{ schema: string; inserted: number; seconds: number; reused: boolean }> {
  const history = opts.history ?? 1_000_000;
  const schema = opts.keepHistory ? `bench_claims_h${history}_${schemaFingerprint()}` : THROWAWAY_SCHEMA;
  if (opts.keepHistory) {
    const stale = await withClient(opts.databaseUrl, async (c) =>
      (
        await c.query<{ nspname: string }>(
          `select nspname from pg_namespace where nspname like $1 and nspname <> $2`,
          [`bench\\_claims\\_h${history}\\_%`, schema],
        )
      ).rows.map((r) => r.nspname),
    );
    for (const s of stale) {
      log(`claims: dropping ${s}, a kept history built for other migrations`);
      await dropSchema(opts.databaseUrl, s);
    }
  } else {
    await dropSchema(opts.databaseUrl, schema);
  }
  let progress = await withClient(opts.databaseUrl, (c) => readProgress(c, schema));
  if (progress?.done) {
    log(`claims: reusing ${schema} (${progress.inserted} finished steps, built before)`);
    return { schema, inserted: 0, seconds: 0, reused: true };
  }
  const sm = await openSchema(opts.databaseUrl, schema);
  let templateId: number;
  try {
    const template = await sm.registerTemplate(TEMPLATE);
    templateId = template.id;
  } finally {
    await sm.close();
  }
  if (progress === undefined) {
    progress = await withClient(opts.databaseUrl, async (c) => {
      await c.query(`set search_path = ${schema}`);
      await c.query(PROGRESS_DDL);
      const { rows } = await c.query<{ anchor: Date }>(`select now() as anchor`);
      const anchor = rows[0]!.anchor;
      // before the progress row: a build killed in between bounds them again (they are still empty)
      const bounded = await boundLegacyPartitions(c, schema, startOfDay(anchor, -HISTORY_DAYS - 1));
      log(`claims: ${bounded} _legacy partitions end before the history's first day`);
      await c.query(`insert into bench_history_progress (target, anchor, fingerprint) values ($1, $2, $3)`, [
        history,
        anchor,
        schemaFingerprint(),
      ]);
      return { target: history, inserted: 0, anchor, done: false };
    });
    log(`claims: building ${schema}: ${history} finished steps`);
  } else {
    log(`claims: resuming the build of ${schema} at ${progress.inserted}/${progress.target} finished steps`);
  }
  const added = await insertHistory(
    opts.databaseUrl,
    source,
    schema,
    model,
    templateId,
    progress,
    opts.historyMaxSeconds ?? 300,
    log,
  );
  log(`claims: ${added.inserted} finished steps inserted in ${added.seconds}s; vacuum analyze`);
  return { schema, inserted: added.inserted, seconds: added.seconds, reused: false };
}

/** Vacuum and analyze one schema's tables (a whole-database vacuum would also walk a kept history). */
async function vacuumSchema(sm: StateManager): Promise<void> {
  const { rows } = await sm.db.pool.query<{ name: string }>(
    `select cl.relname as name from pg_class cl join pg_namespace n on n.oid = cl.relnamespace
     where n.nspname = current_schema() and cl.relkind in ('r', 'p')`,
  );
  await sm.db.pool.query(`vacuum analyze ${rows.map((r) => pg.escapeIdentifier(r.name)).join(", ")}`);
}

/** Tasks the model is picked from: a handful, finished before the history is built. */
const MODEL_TASKS = 10;

/** One measured phase: `ready` fresh ready tasks in `sm`'s schema, from a checkpoint, drained. */
async function measurePhase(
  sm: StateManager,
  ready: number,
  offset: number,
  maxSeconds: number,
  log: (line: string) => void,
): Promise<ClaimPhase> {
  await createReady(sm, ready, offset);
  await vacuumSchema(sm);
  const historySteps = await countFinishedSteps(sm);
  // with those an earlier round's bound left behind: the phase drains them too
  const { rows } = await sm.db.pool.query<{ n: number }>(
    `select count(*)::int as n from steps where state = 'ready'`,
  );
  await startFromCheckpoint(sm.db.pool, log);
  return drain(sm, rows[0]?.n ?? ready, historySteps, maxSeconds);
}

function medianPhase(phases: ClaimPhase[]): ClaimPhase {
  const sorted = [...phases].sort((a, b) => a.stepsPerSecond - b.stepsPerSecond);
  return sorted[Math.floor(sorted.length / 2)]!;
}

export async function measureClaims(opts: ClaimsOptions): Promise<ClaimsResult> {
  const log = opts.log ?? (() => undefined);
  const ready = opts.ready ?? 20_000;
  const history = opts.history ?? 1_000_000;
  const rounds = opts.rounds ?? 1;
  await dropSchema(opts.databaseUrl, EMPTY_SCHEMA);
  let historySchema: string | undefined;
  const empty = await openSchema(opts.databaseUrl, EMPTY_SCHEMA);
  try {
    await empty.registerTemplate(TEMPLATE);
    // the model first, so that both phases run after the (perhaps long) build, under the same load
    await createReady(empty, MODEL_TASKS, 0);
    await drain(empty, MODEL_TASKS, 0, opts.maxSeconds);
    const model = await pickModel(empty);
    const built = await prepareHistory(opts, EMPTY_SCHEMA, model, log);
    historySchema = built.schema;
    const full = await openSchema(opts.databaseUrl, built.schema);
    try {
      await vacuumSchema(full);
      // the ready tasks are created now, perhaps days after a kept history was built: today's partitions
      await withClient(opts.databaseUrl, (c) =>
        createDailyPartitions(c, built.schema, startOfDay(new Date()), startOfDay(new Date(), 2)),
      );
      const emptyRuns: ClaimPhase[] = [];
      const fullRuns: ClaimPhase[] = [];
      for (let round = 0; round < rounds; round++) {
        // alternating which goes first, so neither always runs right after the other's writes
        const order = round % 2 === 0 ? (["empty", "full"] as const) : (["full", "empty"] as const);
        for (const which of order) {
          const sm = which === "empty" ? empty : full;
          const offset = MODEL_TASKS + (round + 1) * ready;
          log(`claims, round ${round + 1}/${rounds}: ${ready} ready one-step tasks, ${which} history`);
          const p = await measurePhase(sm, ready, offset, opts.maxSeconds, log);
          log(`claims: ${which} history (${p.historySteps} finished steps): ${p.stepsPerSecond} steps/s`);
          (which === "empty" ? emptyRuns : fullRuns).push(p);
        }
      }
      const emptyPhase = medianPhase(emptyRuns);
      const withHistory = medianPhase(fullRuns);
      return {
        batch: BATCH,
        rounds,
        empty: emptyPhase,
        withHistory,
        emptyRuns: emptyRuns.map((p) => p.stepsPerSecond),
        withHistoryRuns: fullRuns.map((p) => p.stepsPerSecond),
        historyInserted: built.inserted,
        historySeconds: built.seconds,
        historyTarget: history,
        historyKept: opts.keepHistory === true,
        historyReused: built.reused,
        historyBytes: await schemaBytes(opts.databaseUrl, built.schema),
        ratio: Math.round((withHistory.stepsPerSecond / Math.max(emptyPhase.stepsPerSecond, 1)) * 100) / 100,
      };
    } finally {
      await full.close();
    }
  } finally {
    await empty.close();
    await dropSchema(opts.databaseUrl, EMPTY_SCHEMA).catch(() => undefined);
    if (!opts.keepHistory && historySchema !== undefined)
      await dropSchema(opts.databaseUrl, historySchema).catch(() => undefined);
  }
}

/** Both phases side by side, for the table. */
export function formatClaims(r: ClaimsResult): string {
  const phase = (p: ClaimPhase): string =>
    `${p.stepsPerSecond} steps/s (${p.completed}/${p.readySteps} in ${p.seconds}s; claim ${p.claimMs} ms, complete ${p.completeMs} ms per batch)`;
  const gib = (r.historyBytes / 2 ** 30).toFixed(2);
  const how = r.historyReused
    ? "kept history, reused"
    : `${r.historyInserted} inserted in ${r.historySeconds}s${r.historyKept ? ", kept" : ""}`;
  const runs = (rates: number[]) => (rates.length > 1 ? `; rounds ${rates.join(", ")}` : "");
  return [
    `claims, batch ${r.batch}: ${r.empty.historySteps} finished steps: ${phase(r.empty)}${runs(r.emptyRuns)}`,
    `claims, batch ${r.batch}: ${r.withHistory.historySteps} finished steps (${gib} GiB; ${how}): ${phase(r.withHistory)}` +
      `${runs(r.withHistoryRuns)}  -> ${r.ratio}x of empty`,
  ].join("\n");
}

/** Standalone: prints both phases side by side. */
async function main(): Promise<void> {
  const { parseArgs } = await import("node:util");
  const { values } = parseArgs({
    options: {
      history: { type: "string" },
      ready: { type: "string" },
      seconds: { type: "string" },
      "history-seconds": { type: "string" },
      "no-keep": { type: "boolean" },
      rounds: { type: "string" },
    },
  });
  const { openBenchDatabase, openCachedBenchDatabase } = await import("./harness");
  const log = (line: string): void => void process.stderr.write(`${line}\n`);
  const keep = values["no-keep"] !== true;
  const database = keep ? await openCachedBenchDatabase(log) : await openBenchDatabase(log);
  try {
    const r = await measureClaims({
      databaseUrl: database.url,
      history: Number(values.history ?? 1_000_000),
      ready: Number(values.ready ?? 20_000),
      maxSeconds: Number(values.seconds ?? 15),
      historyMaxSeconds: Number(values["history-seconds"] ?? 3600),
      keepHistory: keep,
      rounds: Number(values.rounds ?? 1),
      log,
    });
    process.stdout.write(`${formatClaims(r)}\n`);
  } finally {
    await database.close();
  }
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) await main();
