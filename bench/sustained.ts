/**
 * A sustained run: a client submits one-step tasks over the client protocol
 * (SUBMIT over tcp) at a fixed rate while one Node pool works them, and the
 * latency from each SUBMIT's send to the commit of the task's last result (in
 * the broker, this process: one clock) is reported as p50 and p99. The rate
 * is a fraction of the measured end-to-end maximum, so a broker that keeps up
 * shows its latency without queueing, and one that does not shows a queue.
 */
import { join } from "node:path";
import { StepbrokerClient } from "../handlers-node/client";
import type { StateManager } from "../broker/state/StateManager";
import { dropBenchSchema, openBenchState, startBrokerAndPool } from "./harness";

export interface SustainedResult {
  /** The rate asked for, tasks/s. */
  targetRate: number;
  /** SUBMITs sent per second over the run (below the target when the client or broker cannot keep up). */
  submittedPerSecond: number;
  submitted: number;
  /** Tasks whose completion was committed before the drain bound. */
  completed: number;
  seconds: number;
  latencyP50Ms: number;
  latencyP99Ms: number;
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

export async function measureSustained(opts: {
  databaseUrl: string;
  rate: number;
  seconds: number;
  capacity: number;
  log?: (line: string) => void;
}): Promise<SustainedResult> {
  const log = opts.log ?? (() => undefined);
  const sm = await openBenchState(opts.databaseUrl, SCHEMA);
  await sm.registerTemplate(TEMPLATE);
  const finishedAt = new Map<string, number>();
  const { broker, stop } = await startBrokerAndPool(noteFinishes(sm, finishedAt), {
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
  const sentAt = new Map<string, number>();
  let sent = 0;
  let inFlight = 0;
  let failure: unknown;
  try {
    const started = performance.now();
    const end = started + opts.seconds * 1000;
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
    if (failure !== undefined) throw failure;
    log(
      `sustained ${opts.rate}/s: ${sent} SUBMITs sent in ${submitSeconds.toFixed(1)}s; waiting for them to finish`,
    );
    // the tail: every submitted task finishes, bounded
    const drainUntil = performance.now() + 30_000;
    while (performance.now() < drainUntil && (inFlight > 0 || finishedAt.size < sent)) {
      await new Promise((r) => setTimeout(r, 20));
    }
    const latencies: number[] = [];
    for (const [taskId, t0] of sentAt) {
      const t1 = finishedAt.get(taskId);
      if (t1 !== undefined) latencies.push(t1 - t0);
    }
    latencies.sort((a, b) => a - b);
    const round2 = (x: number) => Math.round(x * 100) / 100;
    return {
      targetRate: opts.rate,
      submittedPerSecond: Math.round(sent / submitSeconds),
      submitted: sent,
      completed: latencies.length,
      seconds: round2(submitSeconds),
      latencyP50Ms: round2(percentile(latencies, 50)),
      latencyP99Ms: round2(percentile(latencies, 99)),
    };
  } finally {
    client.close();
    await stop();
    await sm.close();
    await dropBenchSchema(opts.databaseUrl, SCHEMA);
  }
}
