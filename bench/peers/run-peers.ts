/**
 * Standalone runner for the peer job-queue benchmarks:
 *
 *   node --import tsx bench/peers/run-peers.ts [--jobs 20000] [--seconds 30] [--only graphile-worker|pg-boss]
 *     [--concurrency N] [--batch-size N] [--no-refetch]
 *
 * --concurrency overrides graphile-worker's concurrent jobs / pg-boss's number
 * of work() loops; --batch-size and --no-refetch are pg-boss tuning knobs.
 *
 * Uses DATABASE_URL when set; otherwise starts a throwaway embedded PostgreSQL
 * (default, durable settings) in a temp directory and removes it afterwards.
 */
import { parseArgs } from "node:util";
import { openBenchDatabase } from "../harness";
import { measureGraphileWorker } from "./graphileWorker";
import { measurePgBoss } from "./pgBoss";
import type { PgBossOptions } from "./pgBoss";
import type { PeerResult } from "./types";

const PEERS: Record<string, (opts: PgBossOptions) => Promise<PeerResult>> = {
  "graphile-worker": measureGraphileWorker,
  "pg-boss": measurePgBoss,
};

function table(results: PeerResult[]): string {
  const rows = [
    ["peer", "version", "jobs", "seconds", "jobs/s"],
    ...results.map((r) => [
      r.name,
      r.version,
      String(r.jobs),
      r.seconds.toFixed(2),
      Math.round(r.jobsPerSecond).toLocaleString("en-US"),
    ]),
  ];
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((row) => row[i]!.length)));
  const line = (row: string[]): string =>
    row.map((cell, i) => (i >= 2 ? cell.padStart(widths[i]!) : cell.padEnd(widths[i]!))).join("  ");
  return [line(rows[0]!), widths.map((w) => "-".repeat(w)).join("  "), ...rows.slice(1).map(line)].join("\n");
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      jobs: { type: "string", default: "20000" },
      seconds: { type: "string", default: "30" },
      only: { type: "string", multiple: true },
      concurrency: { type: "string" },
      "batch-size": { type: "string" },
      "no-refetch": { type: "boolean" },
    },
  });
  const jobs = Number(values.jobs);
  const maxSeconds = Number(values.seconds);
  const concurrency = values.concurrency === undefined ? undefined : Number(values.concurrency);
  const batchSize = values["batch-size"] === undefined ? undefined : Number(values["batch-size"]);
  const refetchWhenFull = values["no-refetch"] === true ? false : undefined;
  if (!Number.isInteger(jobs) || jobs < 1)
    throw new Error(`--jobs must be a positive integer, got ${values.jobs}`);
  if (!(maxSeconds > 0)) throw new Error(`--seconds must be positive, got ${values.seconds}`);
  for (const [flag, v] of [
    ["--concurrency", concurrency],
    ["--batch-size", batchSize],
  ] as const) {
    if (v !== undefined && (!Number.isInteger(v) || v < 1))
      throw new Error(`${flag} must be a positive integer`);
  }
  const names = values.only ?? Object.keys(PEERS);
  for (const name of names)
    if (!(name in PEERS)) throw new Error(`unknown peer ${name}; known: ${Object.keys(PEERS).join(", ")}`);

  const log = (line: string): void => console.error(`# ${line}`);
  const db = await openBenchDatabase(log);
  log(`database: ${db.server ? "embedded PostgreSQL (durable commits, default settings)" : "DATABASE_URL"}`);

  const results: PeerResult[] = [];
  try {
    for (const name of names) {
      log(`${name}: ${jobs} jobs, bound ${maxSeconds}s`);
      const result = await PEERS[name]!({
        databaseUrl: db.url,
        jobs,
        maxSeconds,
        concurrency,
        batchSize,
        refetchWhenFull,
        log,
      });
      log(`${name}: ${result.settings}`);
      results.push(result);
    }
  } finally {
    await db.close();
  }

  console.log(table(results));
  for (const r of results) console.log(`\n${r.name} ${r.version}: ${r.settings}`);
}

main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
