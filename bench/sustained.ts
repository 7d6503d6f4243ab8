/**
 * A sustained run: a client submits one-step tasks over the client protocol
 * (SUBMIT over tcp) at a fixed rate while one Node pool works them, and the
 * latency from each SUBMIT's send to the commit of the task's last result (in
 * the broker, this process: one clock) is reported as p50 and p99, over the
 * tasks submitted after a warm-up. The rate is a fraction of the saturated
 * rate (measureSaturated: tasks submitted while they are run, the most the
 * whole path takes), so a broker that keeps up shows its latency without
 * queueing, and one that does not shows a queue.
 */
import { join } from "node:path";
import { StepbrokerClient } from "../handlers-node/client";
import type { StateManager } from "../broker/state/StateManager";
import type pg from "pg";
import { startFromCheckpoint } from "./checkpoint";
import { dropBenchSchema, openBenchState, startBrokerAndPool } from "./harness";
import { recordStages, type StageRecorder, type StageSplit } from "./recordStages";

export interface SustainedResult {
  /** The rate asked for, tasks/s. */
  targetRate: number;
  /** SUBMITs sent per second over the run (below the target when the client or broker cannot keep up). */
  submittedPerSecond: number;
  submitted: number;
  /** Tasks whose completion was committed before the drain bound. */
  completed: number;
  /** The measured stretch, after the warm-up. */
  seconds: number;
  /** The first seconds, whose tasks are run but not in the percentiles (a cold broker and pool are JIT-compiling). */
  warmupSeconds: number;
  /** Tasks submitted after the warm-up whose completion was committed: the percentiles' population. */
  measured: number;
  latencyP50Ms: number;
  latencyP99Ms: number;
  /** With `stages`: where the time went (recordStages), over the same tasks. */
  stages?: StageSplit;
  /** What PostgreSQL did meanwhile (see WalDuring). */
  wal?: WalDuring;
}

/**
 * Checkpoints PostgreSQL started, and WAL it wrote, from the start of a run
 * to the end of its submissions. A checkpoint within a run makes its commits'
 * fsyncs wait behind the checkpoint's writes and its first page changes write
 * whole pages, so a latency figure is only comparable with another when
 * neither had one (each run starts from a CHECKPOINT of its own, as every
 * other measured phase does).
 */
export interface WalDuring {
  checkpoints: number;
  walMegabytes: number;
}

/** The most the whole path takes: a client keeps SUBMITs outstanding while the pool works the tasks. */
export interface SaturatedResult {
  inFlight: number;
  /** Tasks completed per second after the warm-up, while submissions kept up the window. */
  tasksPerSecond: number;
  completed: number;
  seconds: number;
  warmupSeconds: number;
  wal?: WalDuring;
}

const SCHEMA = "bench_sustained";
const TEMPLATE = {
  namespace: "bench",
  name: "one",
  version: "1",
  steps: [{ name: "work", handler: "noop" }],
};
/** How often the pacer wakes; each wake sends what the rate owes since the start. */
const TICK_MS = 5;
/** SUBMITs outstanding at most: past this the pacer waits, and the shortfall shows in submittedPerSecond. */
const MAX_IN_FLIGHT = 2048;

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] ?? NaN;
}

/** The real state manager, noting when each task's finishing transaction returned. */
function noteFinishes(sm: StateManager, finishedAt: Map<string, number>): StateManager {
  const noting = Object.create(sm) as StateManager;
  noting.completeAttempts = async (results, claim) => {
    const out = await sm.completeAttempts(results, claim);
    const now = performance.now();
    for (const t of out.finishedTasks) finishedAt.set(t.taskId, now);
    return out;
  };
  return noting;
}

interface Stack {
  client: StepbrokerClient;
  /** When each task's finishing transaction returned (performance.now()), by task id. */
  finishedAt: Map<string, number>;
  stages?: StageRecorder;
  /** WalDuring since the run started (after its checkpoint); undefined where PostgreSQL does not say. */
  walSoFar(): Promise<WalDuring | undefined>;
}

interface WalMark {
  checkpoints: number;
  bytes: number;
}

/** pg_stat_checkpointer is PostgreSQL 17's; an older server (or a role that cannot read it) gives none. */
async function walMark(pool: pg.Pool): Promise<WalMark | undefined> {
  try {
    const { rows } = await pool.query<{ checkpoints: string; bytes: string }>(
      `select (select num_timed + num_requested from pg_stat_checkpointer) as checkpoints,
              pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0') as bytes`,
    );
    return { checkpoints: Number(rows[0]!.checkpoints), bytes: Number(rows[0]!.bytes) };
  } catch {
    return undefined;
  }
}

async function withStack<T>(
  opts: { databaseUrl: string; capacity: number; stages?: boolean; log?: (line: string) => void },
  run: (stack: Stack) => Promise<T>,
): Promise<T> {
  const sm = await openBenchState(opts.databaseUrl, SCHEMA);
  await sm.registerTemplate(TEMPLATE);
  // as every other measured phase: what earlier phases wrote is not this run's to pay for
  await startFromCheckpoint(sm.db.pool, opts.log ?? (() => undefined));
  const start = await walMark(sm.db.pool);
  const walSoFar = async (): Promise<WalDuring | undefined> => {
    const now = await walMark(sm.db.pool);
    if (!start || !now) return undefined;
    // the run's own CHECKPOINT is counted before `start` was read
    return {
      checkpoints: now.checkpoints - start.checkpoints,
      walMegabytes: Math.round((now.bytes - start.bytes) / 1e5) / 10,
    };
  };
  const finishedAt = new Map<string, number>();
  const stages = opts.stages === true ? recordStages(sm) : undefined;
  const { broker, stop } = await startBrokerAndPool(noteFinishes(stages?.state ?? sm, finishedAt), {
    label: "node",
    cmd: process.execPath,
    args: (endpoint) => [
      "--import",
      "tsx",
      join(import.meta.dirname, "pool.ts"),
      endpoint,
      String(opts.capacity),
    ],
  });
  const client = new StepbrokerClient({ endpoint: broker.endpoints[0]!, requestTimeoutMs: 30_000 });
  try {
    return await run({ client, finishedAt, walSoFar, ...(stages ? { stages } : {}) });
  } finally {
    client.close();
    await stop();
    await sm.close();
    await dropBenchSchema(opts.databaseUrl, SCHEMA);
  }
}

/** Waits, bounded, until every submitted task has finished. */
async function drain(stack: Stack, submitted: () => number, inFlight: () => number): Promise<void> {
  const drainUntil = performance.now() + 30_000;
  while (performance.now() < drainUntil && (inFlight() > 0 || stack.finishedAt.size < submitted())) {
    await new Promise((r) => setTimeout(r, 20));
  }
}

/**
 * SUBMITs at `rate` for `warmupSeconds + seconds`; the percentiles are of the
 * tasks submitted after the warm-up, so they show the broker at work rather
 * than its first second of JIT compilation and connection setup.
 */
export async function measureSustained(opts: {
  databaseUrl: string;
  rate: number;
  seconds: number;
  warmupSeconds: number;
  capacity: number;
  log?: (line: string) => void;
  /** Also split each task's time by stage (recordStages); the wrapping costs a little broker CPU. */
  stages?: boolean;
}): Promise<SustainedResult> {
  const log = opts.log ?? (() => undefined);
  return withStack(opts, async (stack) => {
    const { client, finishedAt } = stack;
    const sentAt = new Map<string, number>();
    let sent = 0;
    let inFlight = 0;
    let failure: unknown;
    const started = performance.now();
    const measuredFrom = started + opts.warmupSeconds * 1000;
    const end = measuredFrom + opts.seconds * 1000;
    const submitOne = (n: number): void => {
      const t0 = performance.now();
      inFlight++;
      client
        .submit({ namespace: TEMPLATE.namespace, name: TEMPLATE.name }, { n })
        .then(({ task }) => sentAt.set(task.task_id, t0))
        .catch((err: unknown) => (failure ??= err))
        .finally(() => inFlight--);
    };
    for (let now = performance.now(); now < end && failure === undefined; now = performance.now()) {
      const owed = Math.floor(((now - started) / 1000) * opts.rate);
      while (sent < owed && inFlight < MAX_IN_FLIGHT) submitOne(sent++);
      await new Promise((r) => setTimeout(r, TICK_MS));
    }
    const submitSeconds = (performance.now() - started) / 1000;
    const wal = await stack.walSoFar();
    if (failure !== undefined) throw failure;
    log(
      `sustained ${opts.rate}/s: ${sent} SUBMITs sent in ${submitSeconds.toFixed(1)}s (the first ${opts.warmupSeconds}s a warm-up); waiting for them to finish`,
    );
    await drain(
      stack,
      () => sent,
      () => inFlight,
    );
    const latencies: number[] = [];
    let completed = 0;
    for (const [taskId, t0] of sentAt) {
      const t1 = finishedAt.get(taskId);
      if (t1 === undefined) continue;
      completed++;
      if (t0 >= measuredFrom) latencies.push(t1 - t0);
    }
    latencies.sort((a, b) => a - b);
    const round2 = (x: number) => Math.round(x * 100) / 100;
    return {
      targetRate: opts.rate,
      submittedPerSecond: Math.round(sent / submitSeconds),
      submitted: sent,
      completed,
      seconds: round2(submitSeconds - opts.warmupSeconds),
      warmupSeconds: opts.warmupSeconds,
      measured: latencies.length,
      latencyP50Ms: round2(percentile(latencies, 50)),
      latencyP99Ms: round2(percentile(latencies, 99)),
      ...(stack.stages ? { stages: stack.stages.report(sentAt, measuredFrom, end) } : {}),
      ...(wal ? { wal } : {}),
    };
  });
}

/**
 * The sustained runs' maximum: one client keeps `inFlight` SUBMITs outstanding
 * while the pool works the tasks, so submission and execution share the
 * broker, the database and the two cores as they do in a sustained run. Its
 * rate is tasks completed per second after the warm-up.
 */
export async function measureSaturated(opts: {
  databaseUrl: string;
  inFlight: number;
  seconds: number;
  warmupSeconds: number;
  capacity: number;
}): Promise<SaturatedResult> {
  return withStack(opts, async (stack) => {
    const { client, finishedAt } = stack;
    let sent = 0;
    let inFlight = 0;
    let failure: unknown;
    let wake: (() => void) | undefined;
    const started = performance.now();
    const measuredFrom = started + opts.warmupSeconds * 1000;
    const end = measuredFrom + opts.seconds * 1000;
    while (performance.now() < end && failure === undefined) {
      while (inFlight < opts.inFlight) {
        inFlight++;
        client
          .submit({ namespace: TEMPLATE.namespace, name: TEMPLATE.name }, { n: sent++ })
          .catch((err: unknown) => (failure ??= err))
          .finally(() => {
            inFlight--;
            wake?.();
          });
      }
      // a reply frees a slot; the bound keeps the loop looking at the clock
      await new Promise<void>((r) => {
        wake = r;
        setTimeout(r, 50);
      });
    }
    if (failure !== undefined) throw failure;
    const stoppedAt = performance.now();
    const wal = await stack.walSoFar();
    await drain(
      stack,
      () => sent,
      () => inFlight,
    );
    let completed = 0;
    for (const t of finishedAt.values()) if (t >= measuredFrom && t < stoppedAt) completed++;
    const seconds = (stoppedAt - measuredFrom) / 1000;
    return {
      inFlight: opts.inFlight,
      tasksPerSecond: Math.round(completed / seconds),
      completed,
      seconds: Math.round(seconds * 100) / 100,
      warmupSeconds: opts.warmupSeconds,
      ...(wal ? { wal } : {}),
    };
  });
}
