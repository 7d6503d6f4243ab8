/**
 * Claim speed against history: claimSteps + completeAttempts (batch 100) on
 * ~20k ready one-step tasks, first with an empty history, then again after
 * ~1,000,000 finished steps were added. Dispatch reads the partial index of
 * ready steps and reaches everything else by primary key, so the two figures
 * should be close: cost follows ready work, not history.
 *
 * The history is made the way real history looks: the first phase's tasks
 * finish through the real StateManager, and one of them is the model that
 * set-based INSERT ... SELECT FROM generate_series statements copy into every
 * table it touched (task, step, attempt, step and task transitions), with new
 * ids and shifted timestamps. Copying a real finished task keeps the copies
 * within every constraint and in step with whatever the SQL writes today.
 *
 *   node --import tsx bench/claims.ts [--history 1000000] [--ready 20000] [--seconds 15]
 * (run.ts calls measureClaims; run alone it uses DATABASE_URL, or an embedded server.)
 */
import { pathToFileURL } from "node:url";
import pg from "pg";
import { openDatabase } from "../broker/db/openDatabase";
import { StateManager } from "../broker/state/StateManager";
import { startFromCheckpoint } from "./checkpoint";

export const CLAIMS_SCHEMA = "bench_claims";
const BROKER_ID = "bench-claims";
const HANDLER = "noop";
const BATCH = 100;
/** History rows per INSERT statement (one transaction each): big enough to be set-based, small enough to stop near a deadline. */
const HISTORY_CHUNK = 50_000;

export interface ClaimPhase {
  /** Finished steps in the schema when the phase started. */
  historySteps: number;
  /** Ready one-step tasks created for the phase. */
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
  empty: ClaimPhase;
  withHistory: ClaimPhase;
  /** Finished steps actually inserted (less than asked when the insert bound hit). */
  historyInserted: number;
  historySeconds: number;
  /** withHistory / empty throughput. */
  ratio: number;
}

export interface ClaimsOptions {
  databaseUrl: string;
  /** Ready one-step tasks per phase. Default 20,000. */
  ready?: number;
  /** Finished steps to add between the phases. Default 1,000,000. */
  history?: number;
  /** Bound on each measured phase, in seconds. */
  maxSeconds: number;
  /** Bound on the history insert, in seconds. Default 300. */
  historyMaxSeconds?: number;
  log?: (line: string) => void;
}

const TEMPLATE = {
  namespace: "bench",
  name: "claims",
  version: "1",
  steps: [{ name: "work", handler: HANDLER }],
};

async function dropSchema(url: string): Promise<void> {
  const c = new pg.Client({ connectionString: url });
  c.on("error", () => undefined);
  await c.connect();
  try {
    await c.query(`drop schema if exists ${CLAIMS_SCHEMA} cascade`);
  } finally {
    await c.end();
  }
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

/**
 * Copies the model task (a real finished one-step task) `to - from + 1` times
 * in one statement: each copy gets new task, step and attempt ids, timestamps
 * shifted to one millisecond apart a day back, and every row the model has in
 * tasks, steps, step_attempts, step_transitions and task_transitions.
 */
const COPY_HISTORY = `
with m as (select * from tasks where id = $1::uuid),
ms as (select * from steps where task_id = $1::uuid),
ma as (select * from step_attempts where step_id = any(array(select id from ms))),
g as (
  select i, gen_random_uuid() as task_id, gen_random_uuid() as step_id, gen_random_uuid() as attempt_id,
         (now() - interval '1 day' + i * interval '1 millisecond') - (select created_at from m) as shift
  from generate_series($2::int, $3::int) as i
),
new_tasks as (
  insert into tasks (id, template_id, state, context, priority, idempotency_key, error, created_at, finished_at)
  select g.task_id, m.template_id, m.state, jsonb_build_object('n', g.i), m.priority, null, m.error,
         m.created_at + g.shift, m.finished_at + g.shift
  from g cross join m
),
new_steps as (
  insert into steps (id, task_id, position, name, handler, config, state, output, has_output, error, attempts, max_attempts,
                     retryable, backoff_initial_ms, backoff_multiplier, backoff_max_ms, backoff_jitter, timeout_ms,
                     pending_parents, run_at, priority, lease_attempt_id, lease_broker_id, lease_expires_at, created_at, finished_at)
  select g.step_id, g.task_id, s.position, s.name, s.handler, s.config, s.state, s.output, s.has_output, s.error, s.attempts,
         s.max_attempts, s.retryable, s.backoff_initial_ms, s.backoff_multiplier, s.backoff_max_ms, s.backoff_jitter, s.timeout_ms,
         s.pending_parents, s.run_at + g.shift, s.priority, null, null, null, s.created_at + g.shift, s.finished_at + g.shift
  from g cross join ms s
),
new_attempts as (
  insert into step_attempts (attempt_id, step_id, task_id, attempt, broker_id, pool_id, started_at, finished_at, duration_ms,
                             outcome, error, output_bytes, cost, tokens, artifacts)
  select g.attempt_id, g.step_id, g.task_id, a.attempt, a.broker_id, a.pool_id, a.started_at + g.shift, a.finished_at + g.shift,
         a.duration_ms, a.outcome, a.error, a.output_bytes, a.cost, a.tokens, a.artifacts
  from g cross join ma a
),
new_step_history as (
  insert into step_transitions (step_id, task_id, from_state, to_state, event, attempt_id, metadata, sort_key, most_recent, created_at)
  select g.step_id, g.task_id, t.from_state, t.to_state, t.event, case when t.attempt_id is not null then g.attempt_id end,
         t.metadata, t.sort_key, t.most_recent, t.created_at + g.shift
  from g cross join (select * from step_transitions where task_id = $1::uuid) t
)
insert into task_transitions (task_id, from_state, to_state, event, attempt_id, metadata, sort_key, most_recent, created_at)
select g.task_id, t.from_state, t.to_state, t.event, case when t.attempt_id is not null then g.attempt_id end,
       t.metadata, t.sort_key, t.most_recent, t.created_at + g.shift
from g cross join (select * from task_transitions where task_id = $1::uuid) t`;

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
    throw new Error(
      "no finished one-step task to copy the history from (did the first phase complete anything?)",
    );
  return id;
}

async function insertHistory(
  sm: StateManager,
  model: string,
  steps: number,
  maxSeconds: number,
  log: (line: string) => void,
): Promise<{ inserted: number; seconds: number }> {
  const started = performance.now();
  const deadline = started + maxSeconds * 1000;
  let inserted = 0;
  let lastLog = started;
  const client = await sm.db.pool.connect();
  try {
    while (inserted < steps) {
      if (performance.now() >= deadline) {
        log(`claims: history bound of ${maxSeconds}s hit after ${inserted} finished steps`);
        break;
      }
      const n = Math.min(HISTORY_CHUNK, steps - inserted);
      await client.query("begin");
      try {
        // setup only: a crash here loses nothing that matters, and the measured phases commit durably as usual
        await client.query("set local synchronous_commit = off");
        await client.query(COPY_HISTORY, [model, inserted + 1, inserted + n]);
        await client.query("commit");
      } catch (err) {
        await client.query("rollback").catch(() => undefined);
        throw err;
      }
      inserted += n;
      if (performance.now() - lastLog >= 5000) {
        lastLog = performance.now();
        log(
          `claims: ${inserted}/${steps} finished steps inserted after ${((lastLog - started) / 1000).toFixed(1)}s`,
        );
      }
    }
  } finally {
    client.release();
  }
  return { inserted, seconds: Math.round(((performance.now() - started) / 1000) * 100) / 100 };
}

export async function measureClaims(opts: ClaimsOptions): Promise<ClaimsResult> {
  const log = opts.log ?? (() => undefined);
  const ready = opts.ready ?? 20_000;
  const history = opts.history ?? 1_000_000;
  await dropSchema(opts.databaseUrl);
  const sm = new StateManager(
    await openDatabase({ databaseUrl: opts.databaseUrl, schema: CLAIMS_SCHEMA, poolSize: 2 }),
  );
  try {
    await sm.migrate();
    await sm.registerTemplate(TEMPLATE);

    log(`claims: ${ready} ready one-step tasks, empty history`);
    await createReady(sm, ready, 0);
    await sm.db.pool.query("vacuum analyze");
    await startFromCheckpoint(sm.db.pool, log);
    const empty = await drain(sm, ready, 0, opts.maxSeconds);
    log(`claims: empty history: ${empty.stepsPerSecond} steps/s`);

    const model = await pickModel(sm);
    log(`claims: inserting ${history} finished steps of history`);
    const added = await insertHistory(sm, model, history, opts.historyMaxSeconds ?? 300, log);
    log(`claims: ${added.inserted} finished steps inserted in ${added.seconds}s; vacuum analyze`);
    await sm.db.pool.query("vacuum analyze");
    const historySteps = await countFinishedSteps(sm);

    log(`claims: ${ready} ready one-step tasks, ${historySteps} finished steps of history`);
    await createReady(sm, ready, ready);
    await sm.db.pool.query("vacuum analyze");
    await startFromCheckpoint(sm.db.pool, log);
    const withHistory = await drain(sm, ready, historySteps, opts.maxSeconds);
    log(`claims: with history: ${withHistory.stepsPerSecond} steps/s`);

    return {
      batch: BATCH,
      empty,
      withHistory,
      historyInserted: added.inserted,
      historySeconds: added.seconds,
      ratio: Math.round((withHistory.stepsPerSecond / Math.max(empty.stepsPerSecond, 1)) * 100) / 100,
    };
  } finally {
    await sm.db.pool.query(`drop schema if exists ${CLAIMS_SCHEMA} cascade`).catch(() => undefined);
    await sm.close();
  }
}

/** Standalone: prints both phases side by side. */
async function main(): Promise<void> {
  const { parseArgs } = await import("node:util");
  const { values } = parseArgs({
    options: { history: { type: "string" }, ready: { type: "string" }, seconds: { type: "string" } },
  });
  const { openBenchDatabase } = await import("./harness");
  const log = (line: string): void => void process.stderr.write(`${line}\n`);
  const database = await openBenchDatabase(log);
  try {
    const r = await measureClaims({
      databaseUrl: database.url,
      history: Number(values.history ?? 1_000_000),
      ready: Number(values.ready ?? 20_000),
      maxSeconds: Number(values.seconds ?? 15),
      log,
    });
    process.stdout.write(`${formatClaims(r)}\n`);
  } finally {
    await database.close();
  }
}

/** Both phases side by side, for the table. */
export function formatClaims(r: ClaimsResult): string {
  const phase = (p: ClaimPhase): string =>
    `${p.stepsPerSecond} steps/s (${p.completed}/${p.readySteps} in ${p.seconds}s; claim ${p.claimMs} ms, complete ${p.completeMs} ms per batch)`;
  return [
    `claims, batch ${r.batch}: ${r.empty.historySteps} finished steps: ${phase(r.empty)}`,
    `claims, batch ${r.batch}: ${r.withHistory.historySteps} finished steps: ${phase(r.withHistory)}  -> ${r.ratio}x of empty`,
  ].join("\n");
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) await main();
