/**
 * Submission over the client protocol: a StepbrokerClient sends SUBMIT to a
 * broker over tcp on loopback, and the rate is tasks created (REPLY received)
 * per second. No pool is connected, so the figure is the broker and the
 * database creating tasks, nothing else. Two ways a client sends:
 * - one at a time: each SUBMIT after the last one's REPLY (a client's round trip);
 * - pipelined: `inFlight` SUBMITs outstanding on one socket; the protocol has
 *   no batch SUBMIT, so this is what a busy client gets at best. The broker
 *   creates the SUBMITs that arrive together in one statement (CreateBatcher),
 *   so this measures its group commit of creates.
 */
import { pino } from "pino";
import { Broker } from "../broker/Broker";
import { StepbrokerClient } from "../handlers-node/client";
import { dropBenchSchema, openBenchState } from "./harness";

export interface SubmissionPhase {
  /** Tasks created (REPLY with a task received) within the bound. */
  tasks: number;
  seconds: number;
  tasksPerSecond: number;
  /** SUBMITs outstanding at once: 1 for one at a time. */
  inFlight: number;
  timedOut: boolean;
}

export interface SubmissionResult {
  single: SubmissionPhase;
  pipelined: SubmissionPhase;
}

const SCHEMA = "bench_submission";
const TEMPLATE = {
  namespace: "bench",
  name: "one",
  version: "1",
  steps: [{ name: "work", handler: "noop" }],
};

async function submitMany(
  client: StepbrokerClient,
  total: number,
  inFlight: number,
  maxSeconds: number,
): Promise<SubmissionPhase> {
  const started = performance.now();
  const deadline = started + maxSeconds * 1000;
  let next = 0;
  let created = 0;
  const lane = async (): Promise<void> => {
    while (next < total && performance.now() < deadline) {
      const n = next++;
      const { task } = await client.submit({ namespace: TEMPLATE.namespace, name: TEMPLATE.name }, { n });
      if (task.task_id) created++;
    }
  };
  await Promise.all(Array.from({ length: Math.min(inFlight, total) }, lane));
  const seconds = (performance.now() - started) / 1000;
  return {
    tasks: created,
    seconds: Math.round(seconds * 100) / 100,
    tasksPerSecond: Math.round(created / Math.max(seconds, 1e-3)),
    inFlight,
    timedOut: created < total,
  };
}

export async function measureSubmission(opts: {
  databaseUrl: string;
  /**
   * Tasks for the pipelined phase; the one-at-a-time phase submits a tenth as
   * many (at least 100). Bounded by maxSeconds, and by 5 s (one at a time)
   * and 10 s (pipelined) of steady state.
   */
  tasks: number;
  inFlight: number;
  maxSeconds: number;
  log?: (line: string) => void;
}): Promise<SubmissionResult> {
  const log = opts.log ?? (() => undefined);
  const sm = await openBenchState(opts.databaseUrl, SCHEMA);
  await sm.registerTemplate(TEMPLATE);
  const broker = new Broker({
    endpoints: ["tcp://127.0.0.1:*"],
    state: sm,
    brokerId: "bench-submission",
    logger: pino({ level: process.env.BENCH_LOG_LEVEL ?? "warn" }),
    pollMs: 200,
  });
  await broker.start();
  const client = new StepbrokerClient({ endpoint: broker.endpoints[0]!, requestTimeoutMs: 30_000 });
  try {
    const singleTasks = Math.max(100, Math.round(opts.tasks / 10));
    log(`submission: ${singleTasks} SUBMITs one at a time`);
    // 10 s of steady state is enough for a rate this even, and keeps npm run bench short
    const single = await submitMany(client, singleTasks, 1, Math.min(opts.maxSeconds, 5));
    log(`submission: ${opts.tasks} SUBMITs, ${opts.inFlight} in flight`);
    const pipelined = await submitMany(client, opts.tasks, opts.inFlight, Math.min(opts.maxSeconds, 10));
    return { single, pipelined };
  } finally {
    client.close();
    await broker.stop({ drainMs: 1000 });
    await sm.close();
    await dropBenchSchema(opts.databaseUrl, SCHEMA);
  }
}
