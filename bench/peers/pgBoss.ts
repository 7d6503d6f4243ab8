/**
 * pg-boss peer: enqueue N no-op jobs in bulk with insert(), then time work()
 * loops draining them (start of the first work() until no job of the queue is
 * left in created/retry/active state).
 */
import PgBoss from "pg-boss";
import pg from "pg";
import { installedVersion, quoteIdent, waitForDrain } from "./common";
import type { PeerOptions, PeerResult } from "./types";

export const PGBOSS_SCHEMA = "bench_pgboss";
const QUEUE = "bench_noop";
const INSERT_CHUNK = 5000;

/**
 * pg-boss 10 has no teamSize/teamConcurrency: parallelism comes from calling
 * work() several times. Each work() loop fetches up to batchSize jobs, runs the
 * handler once for the batch, completes the batch with one UPDATE (not
 * awaited), and sleeps for what is left of pollingIntervalSeconds (0.5 s is the
 * minimum the library accepts) unless the round took longer.
 */
export const PGBOSS_DEFAULTS = {
  workers: 4,
  batchSize: 500,
  pollingIntervalSeconds: 0.5,
} as const;

export async function measurePgBoss(opts: PeerOptions): Promise<PeerResult> {
  const log = opts.log ?? (() => undefined);
  const workers = opts.concurrency ?? PGBOSS_DEFAULTS.workers;
  const { pollingIntervalSeconds } = PGBOSS_DEFAULTS;
  const batchSize = Number(process.env.TUNE_BATCH) || PGBOSS_DEFAULTS.batchSize;
  const schema = PGBOSS_SCHEMA;
  const s = quoteIdent(schema);
  const max = workers + 4;
  const version = installedVersion("pg-boss");

  const probe = new pg.Client({ connectionString: opts.databaseUrl });
  const boss = new PgBoss({
    connectionString: opts.databaseUrl,
    schema,
    max,
    application_name: "bench-pgboss",
    // no cron or maintenance during the measurement: nothing here needs them
    supervise: false,
    schedule: false,
    migrate: true,
    pollingIntervalSeconds,
  });
  boss.on("error", (err: Error) => log(`pg-boss error: ${err.message}`));
  let started = false;

  try {
    await probe.connect();
    await probe.query(`DROP SCHEMA IF EXISTS ${s} CASCADE`);

    started = true; // from here on stop() is needed to close pg-boss's pool
    await boss.start();
    await boss.createQueue(QUEUE);

    const enqueueStarted = performance.now();
    for (let done = 0; done < opts.jobs; ) {
      const n = Math.min(INSERT_CHUNK, opts.jobs - done);
      await boss.insert(Array.from({ length: n }, () => ({ name: QUEUE, data: {} })));
      done += n;
    }
    const countPending = async (): Promise<number> =>
      Number(
        (
          await probe.query<{ n: string }>(`SELECT count(*) AS n FROM ${s}.job WHERE name = $1 AND state < 'completed'`, [
            QUEUE,
          ])
        ).rows[0]?.n ?? 0,
      );
    const queued = await countPending();
    if (queued !== opts.jobs) throw new Error(`pg-boss: expected ${opts.jobs} queued jobs, found ${queued}`);
    log(`pg-boss: enqueued ${opts.jobs} jobs in ${((performance.now() - enqueueStarted) / 1000).toFixed(2)}s`);

    const startedAt = performance.now();
    for (let i = 0; i < workers; i++) {
      await boss.work(QUEUE, { batchSize, pollingIntervalSeconds }, async () => {
        // trivial jobs: nothing to do
      });
    }

    const outcome = await waitForDrain({
      total: opts.jobs,
      maxSeconds: opts.maxSeconds,
      startedAt,
      pollMs: 20,
      log,
      label: "pg-boss",
      // same as getQueueSize(QUEUE, { before: "completed" }), on our own connection
      remaining: countPending,
    });
    if (outcome.timedOut) {
      log(`pg-boss: bound of ${opts.maxSeconds}s hit with ${outcome.completed}/${opts.jobs} jobs completed`);
    }

    return {
      name: "pg-boss",
      version,
      jobs: outcome.completed,
      seconds: outcome.seconds,
      jobsPerSecond: outcome.seconds > 0 ? outcome.completed / outcome.seconds : 0,
      settings:
        `${workers} work() loops (v10 has no teamSize/teamConcurrency), batchSize=${batchSize}, ` +
        `pollingIntervalSeconds=${pollingIntervalSeconds} (the minimum), pool max=${max}; standard-policy queue; ` +
        `supervise/schedule off; jobs enqueued beforehand via insert() in chunks of ${INSERT_CHUNK}; ` +
        `schema ${schema}; durable commits (server defaults)`,
    };
  } finally {
    if (started) {
      await boss
        .stop({ graceful: true, wait: true, close: true, timeout: 5000 })
        .catch((err: unknown) => log(`pg-boss: stop failed: ${String(err)}`));
    }
    await probe.end().catch(() => undefined);
  }
}
