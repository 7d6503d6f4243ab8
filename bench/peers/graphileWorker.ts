/**
 * graphile-worker peer: enqueue N no-op jobs in bulk, then time a worker pool
 * draining them (start of run() until the jobs table is empty; graphile-worker
 * deletes a job when it completes).
 */
import { Logger, makeWorkerUtils, run, type Runner } from "graphile-worker";
import pg from "pg";
import { startFromCheckpoint } from "../checkpoint";
import { installedVersion, quoteIdent, waitForDrain } from "./common";
import type { PeerOptions, PeerResult } from "./types";

export const GRAPHILE_WORKER_SCHEMA = "bench_graphile_worker";
const TASK = "bench_noop";
const INSERT_CHUNK = 5000;

/**
 * Tuned on 2 cores with Postgres on the same machine, 20,000 jobs, quiet
 * machine: concurrency 8 to 24 all land at roughly 3,000-4,300 jobs/s (run
 * to run spread is about ±15%), 4 and 32 lower; 16 is the middle of the
 * plateau. useNodeTime made no measurable difference.
 */
export const GRAPHILE_WORKER_DEFAULTS = {
  concurrency: 16,
  pollIntervalMs: 100,
  useNodeTime: true,
} as const;

/** Drops info/debug lines (graphile-worker logs one info line per completed job). */
function quietLogger(log: (line: string) => void): Logger {
  return new Logger((scope) => (level, message) => {
    const lvl = String(level);
    if (lvl === "error" || lvl === "warning")
      log(`graphile-worker ${lvl}${scope.label ? ` [${scope.label}]` : ""}: ${message}`);
  });
}

export async function measureGraphileWorker(opts: PeerOptions): Promise<PeerResult> {
  const log = opts.log ?? (() => undefined);
  const concurrency = opts.concurrency ?? GRAPHILE_WORKER_DEFAULTS.concurrency;
  const { pollIntervalMs, useNodeTime } = GRAPHILE_WORKER_DEFAULTS;
  const schema = GRAPHILE_WORKER_SCHEMA;
  const s = quoteIdent(schema);
  // workers + the LISTEN connection + a spare for housekeeping
  const maxPoolSize = concurrency + 2;
  const version = installedVersion("graphile-worker");
  const logger = quietLogger(log);

  const pool = new pg.Pool({ connectionString: opts.databaseUrl, max: maxPoolSize });
  pool.on("error", (err) => log(`graphile-worker pool error: ${err.message}`));
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

    await startFromCheckpoint(probe, log);
    const startedAt = performance.now();
    runner = await run({
      pgPool: pool,
      schema,
      concurrency,
      pollInterval: pollIntervalMs,
      useNodeTime,
      noHandleSignals: true,
      logger,
      parsedCronItems: [],
      taskList: {
        [TASK]: async () => {
          // trivial job: nothing to do
        },
      },
    });

    const outcome = await waitForDrain({
      total: opts.jobs,
      maxSeconds: opts.maxSeconds,
      startedAt,
      pollMs: 20,
      log,
      label: "graphile-worker",
      // remaining = rows still in the jobs table (completed jobs are deleted)
      remaining: async () =>
        Number(
          (await probe.query<{ n: string }>(`SELECT count(*) AS n FROM ${s}._private_jobs`)).rows[0]?.n ?? 0,
        ),
    });
    if (outcome.timedOut) {
      log(
        `graphile-worker: bound of ${opts.maxSeconds}s hit with ${outcome.completed}/${opts.jobs} jobs completed`,
      );
    }

    return {
      name: "graphile-worker",
      version,
      jobs: outcome.completed,
      seconds: outcome.seconds,
      jobsPerSecond: outcome.seconds > 0 ? outcome.completed / outcome.seconds : 0,
      settings:
        `run() in-process with a pg.Pool of ${maxPoolSize}; concurrency=${concurrency}, pollInterval=${pollIntervalMs}ms, ` +
        `useNodeTime=${useNodeTime}, prepared statements on (the 0.16 default; 0.16 has no local queue or batched completion), ` +
        `noHandleSignals, info/debug logging off; jobs enqueued beforehand via add_jobs() in chunks of ${INSERT_CHUNK}; ` +
        `schema ${schema}; durable commits (server defaults)`,
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
