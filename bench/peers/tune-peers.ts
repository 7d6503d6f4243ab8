/**
 * Finds a peer's best settings on this machine: every combination of the
 * given values, run in rounds, each round in a different order (the machine
 * is shared and its load drifts, so settings are compared within one run,
 * interleaved, never against a figure from another run). Prints each
 * combination's median, min and max jobs/s and the load average of each round.
 *
 *   node --import tsx bench/peers/tune-peers.ts --peer graphile-worker --jobs 30000 --rounds 2 \
 *     --grid concurrency=16,32,64 --grid localQueueSize=100,500,1000 --grid completeJobBatchDelayMs=0,1,5
 *   node --import tsx bench/peers/tune-peers.ts --peer pg-boss --jobs 100000 \
 *     --grid concurrency=1,2,4 --grid batchSize=200,500,1000
 *
 * Grid keys are the peer's option names (GraphileWorkerOptions, PgBossOptions;
 * concurrency is pg-boss's number of work() loops); values are numbers, or
 * true/false. Uses DATABASE_URL when set, otherwise a throwaway embedded PostgreSQL.
 */
import os from "node:os";
import { parseArgs } from "node:util";
import { openBenchDatabase } from "../harness";
import { type GraphileWorkerOptions, measureGraphileWorker } from "./graphileWorker";
import { type PgBossOptions, measurePgBoss } from "./pgBoss";
import type { PeerResult } from "./types";

type Knobs = Record<string, number | boolean>;
const PEERS: Record<string, (opts: GraphileWorkerOptions & PgBossOptions) => Promise<PeerResult>> = {
  "graphile-worker": measureGraphileWorker,
  "pg-boss": measurePgBoss,
};

function parseGrid(specs: string[]): Knobs[] {
  let combos: Knobs[] = [{}];
  for (const spec of specs) {
    const [key, list] = spec.split("=", 2);
    if (!key || !list) throw new Error(`--grid wants key=v1,v2,…, got ${spec}`);
    const values = list.split(",").map((v): number | boolean => {
      if (v === "true" || v === "false") return v === "true";
      const n = Number(v);
      if (!Number.isFinite(n)) throw new Error(`--grid ${key}: ${v} is not a number or true/false`);
      return n;
    });
    combos = combos.flatMap((c) => values.map((v) => ({ ...c, [key]: v })));
  }
  return combos;
}

const label = (k: Knobs): string =>
  Object.entries(k)
    .map(([key, v]) => `${key}=${v}`)
    .join(" ") || "defaults";

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 === 1 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      peer: { type: "string" },
      jobs: { type: "string", default: "30000" },
      seconds: { type: "string", default: "60" },
      rounds: { type: "string", default: "2" },
      grid: { type: "string", multiple: true, default: [] },
    },
  });
  const measure = PEERS[values.peer ?? ""];
  if (measure === undefined) throw new Error(`--peer must be one of ${Object.keys(PEERS).join(", ")}`);
  const jobs = Number(values.jobs);
  const maxSeconds = Number(values.seconds);
  const rounds = Number(values.rounds);
  if (!Number.isInteger(jobs) || jobs < 1) throw new Error("--jobs must be a positive integer");
  if (!Number.isInteger(rounds) || rounds < 1) throw new Error("--rounds must be a positive integer");
  const combos = parseGrid(values.grid);
  const log = (line: string): void => console.error(`# ${line}`);
  const db = await openBenchDatabase(log);
  // a tuning run is long: stopped early, it still stops its server and removes its directory
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    process.once(signal, () => void db.close().finally(() => process.exit(130)));
  }
  const figures = new Map<string, number[]>(combos.map((c) => [label(c), []]));
  const loads: string[] = [];
  try {
    for (let round = 0; round < rounds; round++) {
      // a different order each round: no setting always runs first, or right after the heaviest
      const shift = Math.floor((round * combos.length) / rounds);
      const order = [...combos.slice(shift), ...combos.slice(0, shift)];
      if (round % 2 === 1) order.reverse();
      for (const c of order) {
        const r = await measure({ databaseUrl: db.url, jobs, maxSeconds, log: () => undefined, ...c });
        if (r.jobs < jobs) log(`${label(c)}: bound hit, ${r.jobs}/${jobs} jobs`);
        figures.get(label(c))!.push(r.jobsPerSecond);
        log(`round ${round + 1} ${label(c)}: ${Math.round(r.jobsPerSecond)} jobs/s`);
      }
      loads.push(
        os
          .loadavg()
          .map((l) => l.toFixed(1))
          .join(" "),
      );
    }
  } finally {
    await db.close();
  }
  const rows = [...figures.entries()]
    .map(([k, xs]) => ({ k, med: median(xs), min: Math.min(...xs), max: Math.max(...xs) }))
    .sort((a, b) => b.med - a.med);
  console.log(
    `${values.peer}, ${jobs} jobs, ${rounds} interleaved rounds; load average after each round: ${loads.join(" | ")}`,
  );
  for (const r of rows) {
    console.log(
      `${String(Math.round(r.med)).padStart(7)} median  ${Math.round(r.min)}-${Math.round(r.max)}  ${r.k}`,
    );
  }
}

main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
