/**
 * How far the end-to-end one-step figure is from what the database alone can
 * do on this machine. Both measurements work through one-step tasks created up
 * front, on two connections at once (the broker overlaps claims and
 * completions the same way), in batches of the pool's capacity, with no broker,
 * no sockets and no pool:
 *
 * - "state manager": StateManager.claimSteps + completeAttempts, the SQL the
 *   broker runs;
 * - "write floor": only the rows each one-step task must write, as two bare
 *   statements: at the claim, the step's row, its attempt row, its transition
 *   (with the most_recent flip) and the task's start (row, transition, flip);
 *   at the result, the step's row, the attempt's finish, its transition and
 *   the task's end. No task locks, no STEP fields, no finalize checks, no
 *   retry policy: it is not a state manager, only the cost of its writes.
 *
 * The gap between the two is what the state manager adds to its writes; the gap
 * from the state manager to the end-to-end run is the broker, the pool and the
 * sockets sharing the same cores.
 *
 *   node --import tsx bench/floor.ts [--tasks 60000] [--capacity 2048] [--seconds 30]
 * (run.ts calls measureFloor; run alone it uses DATABASE_URL, or an embedded server.)
 */
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import { StateManager } from "../broker/state/StateManager";
import { startFromCheckpoint } from "./checkpoint";
import { createTasksInBatches, dropBenchSchema, openBenchDatabase, openBenchState } from "./harness";

const SCHEMA = "bench_floor";
const CONNECTIONS = 2;

export interface FloorPhase {
  steps: number;
  seconds: number;
  stepsPerSecond: number;
  /** True when the bound ended the phase before every task was done. */
  timedOut: boolean;
}

export interface FloorResult {
  tasks: number;
  batch: number;
  connections: number;
  writeFloor: FloorPhase;
  stateManager: FloorPhase;
}

export interface FloorOptions {
  databaseUrl: string;
  tasks: number;
  /** Steps per claim, as the broker claims up to a pool's free credit. */
  batch: number;
  maxSeconds: number;
  log?: (line: string) => void;
}

// The writes of a claim, as claim_steps() makes them for a ready step of a pending task.
const BARE_CLAIM = `
with picked as (
  select id from steps
  where state = 'ready' and run_at <= now()
  order by priority desc, run_at
  limit $1
  for update skip locked
),
claimed as (
  update steps s
  set state = 'in_progress', attempts = s.attempts + 1, lease_attempt_id = new_id(), lease_broker_id = 'bench',
      lease_expires_at = now() + s.timeout_ms * interval '1 millisecond'
  from picked p where s.id = p.id
  returning s.id, s.task_id, s.lease_attempt_id, s.attempts
),
attempt_rows as (
  insert into step_attempts (attempt_id, step_id, task_id, attempt, broker_id, pool_id)
  select c.lease_attempt_id, c.id, c.task_id, c.attempts, 'bench', 'bench' from claimed c
),
step_flips as (
  update step_transitions t set most_recent = false
  from claimed c where t.step_id = c.id and t.most_recent
  returning t.step_id, t.task_id, t.sort_key, c.lease_attempt_id
),
step_history as (
  insert into step_transitions (step_id, task_id, from_state, to_state, event, attempt_id, sort_key, most_recent)
  select f.step_id, f.task_id, 'ready', 'in_progress', 'claimed', f.lease_attempt_id, f.sort_key + 1, true
  from step_flips f
),
started as (
  update tasks t set state = 'in_progress'
  from (select distinct task_id from claimed) c
  where t.id = c.task_id and t.state = 'pending'
  returning t.id
),
task_flips as (
  update task_transitions t set most_recent = false
  from started s where t.task_id = s.id and t.most_recent
  returning t.task_id, t.sort_key
),
task_history as (
  insert into task_transitions (task_id, from_state, to_state, event, sort_key, most_recent)
  select f.task_id, 'pending', 'in_progress', 'started', f.sort_key + 1, true from task_flips f
)
select array_agg(c.lease_attempt_id) as attempt_ids from claimed c`;

// The writes of a stored result that ends a one-step task.
const BARE_COMPLETE = `
with stored as (
  update steps s
  set state = 'complete', output = '{}'::jsonb, has_output = true, finished_at = now(),
      lease_attempt_id = null, lease_broker_id = null, lease_expires_at = null
  from step_attempts a
  where a.attempt_id = any($1::uuid[]) and s.id = a.step_id and s.lease_attempt_id = a.attempt_id
  returning s.id, s.task_id, a.attempt_id
),
attempt_rows as (
  update step_attempts a set finished_at = now(), outcome = 'complete', duration_ms = 0
  from stored st where a.attempt_id = st.attempt_id
),
step_flips as (
  update step_transitions t set most_recent = false
  from stored st where t.step_id = st.id and t.most_recent
  returning t.step_id, t.task_id, t.sort_key, st.attempt_id
),
step_history as (
  insert into step_transitions (step_id, task_id, from_state, to_state, event, attempt_id, sort_key, most_recent)
  select f.step_id, f.task_id, 'in_progress', 'complete', 'completed', f.attempt_id, f.sort_key + 1, true
  from step_flips f
),
ended as (
  update tasks t set state = 'complete', finished_at = now()
  from stored st where t.id = st.task_id
  returning t.id
),
task_flips as (
  update task_transitions t set most_recent = false
  from ended e where t.task_id = e.id and t.most_recent
  returning t.task_id, t.sort_key
),
task_history as (
  insert into task_transitions (task_id, from_state, to_state, event, sort_key, most_recent)
  select f.task_id, 'in_progress', 'complete', 'completed', f.sort_key + 1, true from task_flips f
)
select count(*)::int as stored from stored`;

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

async function freshTasks(url: string, tasks: number, log: (line: string) => void): Promise<StateManager> {
  const sm = await openBenchState(url, SCHEMA);
  await sm.registerTemplate({
    namespace: "bench",
    name: "floor",
    version: "1",
    steps: [{ name: "s", handler: "noop" }],
  });
  await createTasksInBatches(sm, tasks, "bench", "floor");
  await startFromCheckpoint(sm.db.pool, log);
  return sm;
}

export async function measureFloor(opts: FloorOptions): Promise<FloorResult> {
  const log = opts.log ?? (() => undefined);

  log(
    `write floor: ${opts.tasks} one-step tasks, bare writes, ${CONNECTIONS} connections, batches of ${opts.batch}`,
  );
  let sm = await freshTasks(opts.databaseUrl, opts.tasks, log);
  let writeFloor: FloorPhase;
  try {
    writeFloor = await drain(CONNECTIONS, opts.maxSeconds, async () => {
      const claimed = await sm.db.pool.query<{ attempt_ids: string[] | null }>(BARE_CLAIM, [opts.batch]);
      const ids = claimed.rows[0]?.attempt_ids ?? [];
      if (ids.length === 0) return 0;
      const stored = await sm.db.pool.query<{ stored: number }>(BARE_COMPLETE, [ids]);
      return stored.rows[0]?.stored ?? 0;
    });
    const [left] = (
      await sm.db.pool.query<{ n: number }>("select count(*)::int as n from tasks where state <> 'complete'")
    ).rows;
    if (!writeFloor.timedOut && left?.n !== 0)
      throw new Error(`write floor left ${left?.n} tasks unfinished`);
  } finally {
    await sm.close();
  }

  log(
    `state manager: ${opts.tasks} one-step tasks, claimSteps + completeAttempts, ${CONNECTIONS} connections`,
  );
  sm = await freshTasks(opts.databaseUrl, opts.tasks, log);
  let stateManager: FloorPhase;
  try {
    stateManager = await drain(CONNECTIONS, opts.maxSeconds, async () => {
      const claimed = await sm.claimSteps({ brokerId: "bench", handlers: ["noop"], limit: opts.batch });
      if (claimed.length === 0) return 0;
      const { outcomes } = await sm.completeAttempts(
        claimed.map((c) => ({ attemptId: c.attempt_id, status: "complete" as const, output: {} })),
      );
      return outcomes.filter((o) => o.outcome === "stored").length;
    });
  } finally {
    await sm.close();
    await dropBenchSchema(opts.databaseUrl, SCHEMA);
  }
  return { tasks: opts.tasks, batch: opts.batch, connections: CONNECTIONS, writeFloor, stateManager };
}

export function formatFloor(f: FloorResult): string {
  return (
    `write floor ${f.writeFloor.stepsPerSecond} steps/s, state manager ${f.stateManager.stepsPerSecond} steps/s ` +
    `(${f.tasks} one-step tasks each, ${f.connections} connections, batches of ${f.batch}, no sockets)`
  );
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  const { values } = parseArgs({
    options: { tasks: { type: "string" }, capacity: { type: "string" }, seconds: { type: "string" } },
  });
  const log = (line: string) => process.stderr.write(`floor: ${line}\n`);
  const database = await openBenchDatabase(log);
  try {
    const result = await measureFloor({
      databaseUrl: database.url,
      tasks: Number(values.tasks ?? 60_000),
      batch: Number(values.capacity ?? 2048),
      maxSeconds: Number(values.seconds ?? 30),
      log,
    });
    process.stdout.write(`${formatFloor(result)}\n`);
  } finally {
    await database.close();
  }
}
