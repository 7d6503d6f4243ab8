/**
 * stepbroker end to end: tasks created up front, then a broker (this process)
 * and one Node.js pool (a child process, over tcp on loopback) run them.
 * Throughput counts steps whose results were committed, from the first commit
 * to the last; latency is from the start of a parent's commit transaction
 * (its finished_at) to its child's arrival at the pool.
 */
import { join } from "node:path";
import { BrokerMetrics } from "../broker/metrics/BrokerMetrics";
import { startFromCheckpoint } from "./checkpoint";
import {
  countCommits,
  cpuPerUnit,
  createTasksInBatches,
  dropBenchSchema,
  openBenchState,
  startBrokerAndPool,
} from "./harness";

export interface StepbrokerResult {
  shape: "one-step" | "diamond";
  capacity: number;
  tasks: number;
  steps: number;
  seconds: number;
  stepsPerSecond: number;
  latencyP50Ms?: number;
  latencyP99Ms?: number;
  /**
   * CPU time per stored step (µs, user + system) of the broker (this process,
   * which runs nothing else meanwhile) and of the pool process, from the pool's
   * READY to the last result: past about 2× the peers, these are the limit.
   */
  brokerCpuMicrosPerStep?: number;
  poolCpuMicrosPerStep?: number;
  /** The same for the PostgreSQL server (every process of it), when it runs on this machine. */
  serverCpuMicrosPerStep?: number;
  /** With `metrics`: how many times the metrics were rendered during the run, one a second as a scraper would. */
  metricsScrapes?: number;
}

const SCHEMA = "bench_stepbroker";
/** Four steps a task: b and c wait for a, d for both (the bench's join). */
export const DIAMOND = {
  namespace: "bench",
  name: "diamond",
  version: "1",
  steps: [
    { name: "a", handler: "stamp" },
    { name: "b", handler: "stamp", depends_on: ["a"] },
    { name: "c", handler: "stamp", depends_on: ["a"] },
    { name: "d", handler: "stamp", depends_on: ["b", "c"] },
  ],
};
const TEMPLATES = [
  { namespace: "bench", name: "one", version: "1", steps: [{ name: "work", handler: "noop" }] },
  DIAMOND,
];

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] ?? NaN;
}

/**
 * BENCH_POOL_CPU_PROF=<dir> profiles the pool process as `node --cpu-prof`
 * does the broker (this process): the pool's profile lands in <dir> when it
 * exits after its SIGTERM drain. BENCH_POOL_NODE_FLAGS (space-separated) gives
 * the pool process Node/V8 flags, to measure one (`--single-threaded-gc`,
 * `--max-semi-space-size=64`) on both processes: the broker's go before
 * `--import tsx` on this process's command line (NODE_OPTIONS refuses most V8 flags).
 */
function poolNodeFlags(): string[] {
  const dir = process.env.BENCH_POOL_CPU_PROF ?? "";
  const flags = (process.env.BENCH_POOL_NODE_FLAGS ?? "").split(" ").filter((f) => f !== "");
  return [...flags, ...(dir === "" ? [] : ["--cpu-prof", "--cpu-prof-dir", dir])];
}

export async function measureStepbroker(opts: {
  databaseUrl: string;
  shape: "one-step" | "diamond";
  tasks: number;
  maxSeconds: number;
  /**
   * The pool's capacity. The broker claims up to the pool's free credit per
   * round, so this is also the largest claim: with handlers that do nothing,
   * throughput follows it (256: ~9,600 steps/s; 2048: ~12,000 on 2 cores).
   */
  capacity: number;
  /** Submit tasks one at a time, each after the last finished: latency without queueing. */
  sequential?: boolean;
  /**
   * Observe the broker with a BrokerMetrics, as `--http` does, and render its
   * /metrics text once a second during the run, as Prometheus would scrape it.
   */
  metrics?: boolean;
  /** Reads the database server's CPU time in µs (bench/harness.ts serverCpuMicros), when it is local. */
  serverCpu?: () => number | undefined;
  log?: (line: string) => void;
}): Promise<StepbrokerResult> {
  const log = opts.log ?? (() => undefined);
  const sm = await openBenchState(opts.databaseUrl, SCHEMA);
  for (const t of TEMPLATES) await sm.registerTemplate(t);
  const name = opts.shape === "one-step" ? "one" : "diamond";
  const stepsPerTask = opts.shape === "one-step" ? 1 : 4;
  log(`creating ${opts.sequential ? 0 : opts.tasks} ${opts.shape} tasks up front…`);
  if (!opts.sequential) await createTasksInBatches(sm, opts.tasks, "bench", name);
  await startFromCheckpoint(sm.db.pool, log);
  const counter = countCommits(sm, opts.tasks * stepsPerTask);

  let metrics: BrokerMetrics | undefined;
  const { broker, stop, poolCpuMicros } = await startBrokerAndPool(
    counter.state,
    {
      label: "node",
      cmd: process.execPath,
      args: (endpoint) => [
        ...poolNodeFlags(),
        "--import",
        "tsx",
        join(import.meta.dirname, "pool.ts"),
        endpoint,
        String(opts.capacity),
      ],
    },
    opts.metrics
      ? (b) => {
          metrics = new BrokerMetrics({
            sources: { pools: () => b.listPools(), queueDepth: () => sm.queueDepth() },
          });
          b.observe(metrics);
        }
      : undefined,
  );
  let scrapes = 0;
  const scraper =
    metrics === undefined
      ? undefined
      : setInterval(() => {
          void metrics!.metrics().then(
            () => scrapes++,
            (e: unknown) => log(`metrics scrape failed: ${String(e)}`),
          );
        }, 1000);
  const brokerCpuBefore = process.cpuUsage();
  const poolCpuBefore = poolCpuMicros();
  const serverCpuBefore = opts.serverCpu?.();
  const timer = setTimeout(counter.finish, opts.maxSeconds * 1000);
  if (opts.sequential) {
    const until = Date.now() + opts.maxSeconds * 1000;
    for (let i = 0; i < opts.tasks && Date.now() < until; i++) {
      const { task } = await broker.submit({ namespace: "bench", name, context: { n: i } });
      await broker.wait(task.task_id, 10_000);
    }
    counter.finish();
  }
  await counter.done;
  clearTimeout(timer);
  if (scraper !== undefined) clearInterval(scraper);
  const brokerCpu = process.cpuUsage(brokerCpuBefore);
  const poolCpuAfter = poolCpuMicros();
  const serverCpuAfter = opts.serverCpu?.();
  const result: StepbrokerResult = {
    shape: opts.shape,
    capacity: opts.capacity,
    tasks: opts.tasks,
    steps: counter.stored(),
    seconds: counter.seconds(),
    stepsPerSecond: counter.stepsPerSecond(),
  };
  if (metrics !== undefined) result.metricsScrapes = scrapes;
  const steps = counter.stored();
  if (steps > 0) {
    result.brokerCpuMicrosPerStep = Math.round(((brokerCpu.user + brokerCpu.system) / steps) * 10) / 10;
    if (poolCpuBefore !== undefined && poolCpuAfter !== undefined)
      result.poolCpuMicrosPerStep = Math.round(((poolCpuAfter - poolCpuBefore) / steps) * 10) / 10;
    const server = cpuPerUnit(serverCpuBefore, serverCpuAfter, steps);
    if (server !== undefined) result.serverCpuMicrosPerStep = server;
  }
  await stop();

  if (opts.shape === "diamond") {
    const { rows } = await sm.db.pool.query<{ latency: number }>(
      `select (c.output->>'arrived_at')::float8 - max(extract(epoch from p.finished_at) * 1000) as latency
       from steps c join step_edges e on e.child_id = c.id join steps p on p.id = e.parent_id
       where c.state = 'complete' group by c.id, c.output`,
    );
    const lat = rows.map((r) => Number(r.latency)).sort((a, b) => a - b);
    result.latencyP50Ms = Math.round(percentile(lat, 50) * 100) / 100;
    result.latencyP99Ms = Math.round(percentile(lat, 99) * 100) / 100;
  }
  await sm.close();
  await dropBenchSchema(opts.databaseUrl, SCHEMA);
  return result;
}
