/**
 * What the end-to-end benchmarks share: creating tasks up front in batches,
 * and counting committed results as the broker sees them, without polling
 * the database. The first commit starts the clock, so it is not counted in
 * the rate.
 */
import pg from "pg";
import { pino } from "pino";
import { openDatabase } from "../broker/db/openDatabase";
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
