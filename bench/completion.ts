/**
 * Completion throughput of the batched path: N one-step tasks created with
 * createTasks, then a loop of claimSteps(limit B) + completeAttempts(batch of B),
 * for B = 1, 100, 1000, each for at most ~10 s, on an embedded PostgreSQL with
 * its default (durable) settings, or on DATABASE_URL when set.
 *
 *   node --import tsx bench/completion.ts [seconds per batch size, default 10]
 *
 * BENCH_SYNCHRONOUS_COMMIT=off runs the embedded server with synchronous_commit=off, to see
 * how much of the small-batch figure is the WAL flush of each commit.
 */
import { openDatabase } from "../broker/db/openDatabase";
import { StateManager } from "../broker/state/StateManager";
import { startFromCheckpoint } from "./checkpoint";
import { openBenchDatabase } from "./harness";

const SECONDS = Number(process.argv[2] ?? 10);
const BATCHES = [1, 100, 1000];
/** Tasks created up front for each batch size: more than the loop can finish in SECONDS at the rates seen here. */
const TASKS: Record<number, number> = { 1: 30_000, 100: 150_000, 1000: 300_000 };

async function main(): Promise<void> {
  const asynchronous = process.env.BENCH_SYNCHRONOUS_COMMIT === "off";
  const database = await openBenchDatabase(
    (line) => console.log(line),
    undefined,
    asynchronous ? ["-c", "synchronous_commit=off"] : [],
  );
  const url = database.url;
  try {
    for (const batch of BATCHES) {
      const schema = `bench_completion_${batch}`;
      const sm = new StateManager(await openDatabase({ databaseUrl: url, schema, poolSize: 4 }));
      try {
        await sm.db.pool.query(`drop schema if exists ${schema} cascade`);
        await sm.migrate();
        await sm.registerTemplate({
          namespace: "bench",
          name: "one",
          version: "1",
          steps: [{ name: "s", handler: "bench" }],
        });
        const total = Math.min(TASKS[batch] ?? 10_000, Math.ceil(SECONDS * 60_000));
        for (let made = 0; made < total; made += 5000) {
          const n = Math.min(5000, total - made);
          await sm.createTasks(
            Array.from({ length: n }, (_, i) => ({
              namespace: "bench",
              name: "one",
              context: { i: made + i },
            })),
          );
        }
        await sm.db.pool.query("vacuum analyze");
        await startFromCheckpoint(sm.db.pool, (line) => console.log(line));

        // WAL written per step: a measure of work that, unlike wall time, does not move with the machine's load.
        const walAt = async (): Promise<string> =>
          (await sm.db.pool.query<{ lsn: string }>("select pg_current_wal_insert_lsn()::text as lsn")).rows[0]
            ?.lsn ?? "0/0";
        const walStart = await walAt();
        const started = process.hrtime.bigint();
        const deadline = started + BigInt(Math.round(SECONDS * 1e9));
        let done = 0;
        let transactions = 0;
        let claimNs = 0n;
        while (process.hrtime.bigint() < deadline) {
          const t0 = process.hrtime.bigint();
          const claimed = await sm.claimSteps({ brokerId: "bench", handlers: ["bench"], limit: batch });
          claimNs += process.hrtime.bigint() - t0;
          if (claimed.length === 0) break;
          const { outcomes } = await sm.completeAttempts(
            claimed.map((c) => ({
              attemptId: c.attempt_id,
              status: "complete" as const,
              output: { ok: true, n: c.context.i ?? null },
            })),
          );
          done += outcomes.filter((o) => o.outcome === "stored").length;
          transactions++;
        }
        const seconds = Number(process.hrtime.bigint() - started) / 1e9;
        const walEnd = await walAt();
        const [wal] = (
          await sm.db.pool.query<{ bytes: number }>("select pg_wal_lsn_diff($1, $2)::float8 as bytes", [
            walEnd,
            walStart,
          ])
        ).rows;
        const [left] = (
          await sm.db.pool.query<{ n: number }>(
            `select count(*)::int as n from tasks where state <> 'complete'`,
          )
        ).rows;
        console.log(
          `B=${String(batch).padStart(4)}: ${done} steps completed in ${seconds.toFixed(2)} s = ${Math.round(done / seconds)} steps/s ` +
            `(${transactions} rounds of ${((seconds * 1000) / Math.max(transactions, 1)).toFixed(2)} ms, ` +
            `claim ${(Number(claimNs) / 1e6 / Math.max(transactions, 1)).toFixed(2)} ms of it; ` +
            `${Math.round((wal?.bytes ?? 0) / Math.max(done, 1))} bytes of WAL per step; ${left?.n ?? "?"} tasks left unfinished)`,
        );
        await sm.db.pool.query(`drop schema ${schema} cascade`);
      } finally {
        await sm.close();
      }
    }
  } finally {
    await database.close();
  }
}

await main();
