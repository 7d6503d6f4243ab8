/**
 * graphile-worker peer: enqueue N no-op jobs in bulk, then time a worker pool
 * draining them (from the first job handled until the jobs table is empty;
 * graphile-worker deletes a job when it completes).
 */
import { Logger, makeWorkerUtils, run, type Runner } from "graphile-worker";
import pg from "pg";
import { startFromCheckpoint } from "../checkpoint";
import { JobCounter, installedVersion, quoteIdent, startCpuClocks, waitForDrain } from "./common";
import type { PeerOptions, PeerResult } from "./types";

export const GRAPHILE_WORKER_SCHEMA = "bench_graphile_worker";
const TASK = "bench_noop";
const INSERT_CHUNK = 5000;

/**
 * The tuned best for graphile-worker 0.17 on 2 cores with PostgreSQL on the
 * same machine: a local queue, so one query fetches and locks a batch for all
 * workers, and batched completion, so one statement completes the jobs that
 * finished within the delay. Prepared statements on (the default).
 *
 * Found with bench/peers/tune-peers.ts, settings interleaved within one run
 * (the machine was shared: load average 4-7, so single figures spread up to
 * 3x; compare medians). 30,000 jobs, 2 rounds, concurrency 16/32/64 x
 * localQueue.size 100/500/1000 x completeJobBatchDelay 0/1/5 ms: size 100
 * medians 3,600-5,700 jobs/s, 500 9,000-18,000, 1000 12,000-17,900; no
 * concurrency or delay stood out beyond the noise. Then 50,000 jobs, 3 rounds,
 * concurrency 32/64 x size 1000/2000 x delay 0/1/5: 64/2000/5 ms had the best
 * median (23,767; next 64/1000/5 at 19,030 and 64/2000/1 at 18,294).
 */
export const GRAPHILE_WORKER_DEFAULTS = {
  concurrency: 64,
  localQueueSize: 2000,
  completeJobBatchDelayMs: 5,
  failJobBatchDelayMs: 5,
  pollIntervalMs: 100,
  preparedStatements: true,
  useNodeTime: true,
} as const;

/** graphile-worker knobs, for tuning runs; the defaults are the tuned best. */
export interface GraphileWorkerOptions extends PeerOptions {
  /** preset.worker.localQueue.size; -1 turns the local queue off. */
  localQueueSize?: number;
  /** preset.worker.completeJobBatchDelay in ms; -1 completes each job on its own. */
  completeJobBatchDelayMs?: number;
  /** preset.worker.failJobBatchDelay in ms; -1 fails each job on its own. */
  failJobBatchDelayMs?: number;
  preparedStatements?: boolean;
}

/** Drops info/debug lines (graphile-worker logs one info line per completed job). */
function quietLogger(log: (line: string) => void): Logger {
  return new Logger((scope) => (level, message) => {
    const lvl = String(level);
    if (lvl === "error" || lvl === "warning")
      log(`graphile-worker ${lvl}${scope.label ? ` [${scope.label}]` : ""}: ${message}`);
  });
}

export async function measureGraphileWorker(opts: GraphileWorkerOptions): Promise<PeerResult> {
  const log = opts.log ?? (() => undefined);
  const d = GRAPHILE_WORKER_DEFAULTS;
  const concurrency = opts.concurrency ?? d.concurrency;
  const localQueueSize = opts.localQueueSize ?? d.localQueueSize;
  const completeJobBatchDelayMs = opts.completeJobBatchDelayMs ?? d.completeJobBatchDelayMs;
  const failJobBatchDelayMs = opts.failJobBatchDelayMs ?? d.failJobBatchDelayMs;
  const preparedStatements = opts.preparedStatements ?? d.preparedStatements;
  const { pollIntervalMs, useNodeTime } = d;
  const schema = GRAPHILE_WORKER_SCHEMA;
  const s = quoteIdent(schema);
  // workers + the LISTEN connection + a spare for housekeeping
  const maxPoolSize = concurrency + 2;
  const version = installedVersion("graphile-worker");
  const logger = quietLogger(log);

  const pool = new pg.Pool({ connectionString: opts.databaseUrl, max: maxPoolSize });
  pool.on("error", (err) => log(`graphile-worker pool error: ${err.message}`));
  // graphile-worker 0.17 checks that every pooled client has an error handler, and warns otherwise
  pool.on("connect", (client) =>
    client.on("error", (err) => log(`graphile-worker connection error: ${err.message}`)),
  );
  // a separate connection for setup and completion polling, outside the worker's pool
  const probe = new pg.Client({ connectionString: opts.databaseUrl });
  probe.on("error", (err: Error) => log(`graphile-worker probe connection error: ${err.message}`));
  let runner: Runner | undefined;
  let migrated = false;

  try {
    await probe.connect();
    await probe.query(`DROP SCHEMA IF EXISTS ${s} CASCADE`);

    const utils = await makeWorkerUtils({ pgPool: pool, schema, logger });
    try {
      migrated = true;
      await utils.migrate();
    } finally {
      await utils.release();
    }

    // bulk enqueue through graphile-worker's own add_jobs(job_spec[])
    const enqueueStarted = performance.now();
    for (let done = 0; done < opts.jobs;) {
      const n = Math.min(INSERT_CHUNK, opts.jobs - done);
      await probe.query(
        `SELECT count(*) FROM ${s}.add_jobs(ARRAY(
           SELECT json_populate_record(NULL::${s}.job_spec, json_build_object('identifier', $2::text))
           FROM generate_series(1, $1::int)))`,
        [n, TASK],
      );
      done += n;
    }
    const queued = Number(
      (await probe.query<{ n: string }>(`SELECT count(*) AS n FROM ${s}._private_jobs`)).rows[0]?.n ?? 0,
    );
    if (queued !== opts.jobs)
      throw new Error(`graphile-worker: expected ${opts.jobs} queued jobs, found ${queued}`);
    log(
      `graphile-worker: enqueued ${opts.jobs} jobs in ${((performance.now() - enqueueStarted) / 1000).toFixed(2)}s`,
    );

    // statistics for the planner, as a queue in steady state has (pg-boss gets the same)
    await probe.query(`VACUUM ANALYZE ${s}._private_jobs`);
    await startFromCheckpoint(probe, log);
    const counter = new JobCounter();
    const cpuClocks = startCpuClocks(opts.serverCpu);
    const startedAt = performance.now();
    runner = await run({
      pgPool: pool,
      schema,
      concurrency,
      pollInterval: pollIntervalMs,
      useNodeTime,
      noPreparedStatements: !preparedStatements,
      noHandleSignals: true,
      logger,
      parsedCronItems: [],
      preset: {
        worker: {
          localQueue: { size: localQueueSize },
          completeJobBatchDelay: completeJobBatchDelayMs,
          failJobBatchDelay: failJobBatchDelayMs,
        },
      },
      taskList: {
        [TASK]: async () => {
          // trivial job: nothing to do but be counted
          counter.add(1);
        },
      },
    });

    const outcome = await waitForDrain({
      total: opts.jobs,
      maxSeconds: opts.maxSeconds,
      boundFrom: startedAt,
      counter,
      pollMs: 5,
      log,
      label: "graphile-worker",
      // remaining = rows still in the jobs table (completed jobs are deleted)
      remaining: async () =>
        Number(
          (await probe.query<{ n: string }>(`SELECT count(*) AS n FROM ${s}._private_jobs`)).rows[0]?.n ?? 0,
        ),
    });
    const cpu = cpuClocks(outcome.completed);
    if (outcome.timedOut) {
      log(
        `graphile-worker: bound of ${opts.maxSeconds}s hit with ${outcome.completed}/${opts.jobs} jobs completed`,
      );
    }

    const options = {
      concurrency,
      "localQueue.size": localQueueSize,
      completeJobBatchDelay: completeJobBatchDelayMs,
      failJobBatchDelay: failJobBatchDelayMs,
      preparedStatements,
      pollInterval: pollIntervalMs,
      useNodeTime,
      maxPoolSize,
    };
    return {
      name: "graphile-worker",
      version,
      ...cpu,
      jobs: outcome.completed,
      seconds: outcome.seconds,
      jobsPerSecond: outcome.seconds > 0 ? outcome.completed / outcome.seconds : 0,
      options,
      settings:
        `run() in-process with a pg.Pool of ${maxPoolSize}; concurrency=${concurrency}, ` +
        `preset.worker.localQueue.size=${localQueueSize}, completeJobBatchDelay=${completeJobBatchDelayMs}ms, ` +
        `failJobBatchDelay=${failJobBatchDelayMs}ms, prepared statements ${preparedStatements ? "on" : "off"}, ` +
        `pollInterval=${pollIntervalMs}ms, useNodeTime=${useNodeTime}, noHandleSignals, info/debug logging off; ` +
        `jobs enqueued beforehand via add_jobs() in chunks of ${INSERT_CHUNK}, then VACUUM ANALYZE; clock from the first job's handler ` +
        `call to the jobs table seen empty; schema ${schema}; durable commits (server defaults)`,
    };
  } finally {
    if (runner !== undefined) {
      await runner.stop().catch((err: unknown) => log(`graphile-worker: stop failed: ${String(err)}`));
    }
    // runner.stop() waited for its jobs and listener: nothing uses the schema any more
    if (migrated) await probe.query(`DROP SCHEMA IF EXISTS ${s} CASCADE`).catch(() => undefined);
    await probe.end().catch(() => undefined);
    await pool.end().catch(() => undefined);
  }
}
