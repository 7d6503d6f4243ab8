/**
 * npm run bench: stepbroker end to end beside graphile-worker and pg-boss, on
 * the same PostgreSQL in the same run (an embedded one unless DATABASE_URL is
 * set), each bounded in time. Prints a table; with --json, one JSON object on
 * the last line.
 *   npm run bench -- [--tasks 30000] [--seconds 30] [--json]
 */
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";
import { startEmbeddedPostgres, type EmbeddedServer } from "../broker/db/embedded";
import { measureGraphileWorker } from "./peers/graphileWorker";
import { measurePgBoss } from "./peers/pgBoss";
import { measureStepbroker } from "./stepbroker";

const { values } = parseArgs({
  options: { tasks: { type: "string" }, seconds: { type: "string" }, json: { type: "boolean" }, "no-peers": { type: "boolean" } },
});
const tasks = Number(values.tasks ?? 30_000);
const seconds = Number(values.seconds ?? 30);
const log = (line: string) => process.stderr.write(`bench: ${line}\n`);

let server: EmbeddedServer | undefined;
let dir: string | undefined;
let url = process.env.DATABASE_URL ?? "";
try {
  if (!url) {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), "stepbroker-bench-"));
    await fs.chmod(dir, 0o755);
    log("starting an embedded PostgreSQL (durable commits, default settings)");
    server = await startEmbeddedPostgres({ dataDir: path.join(dir, "pgdata") });
    url = server.url;
  }
  log(`stepbroker: ${tasks} one-step tasks`);
  const one = await measureStepbroker({ databaseUrl: url, shape: "one-step", tasks, maxSeconds: seconds, log });
  log(`stepbroker: ${Math.round(tasks / 4)} diamond tasks`);
  const diamond = await measureStepbroker({ databaseUrl: url, shape: "diamond", tasks: Math.round(tasks / 4), maxSeconds: seconds, log });
  log("stepbroker: 200 diamond tasks one at a time (latency without queueing)");
  const lone = await measureStepbroker({ databaseUrl: url, shape: "diamond", tasks: 200, maxSeconds: seconds, sequential: true, log });
  const peers = [];
  if (!values["no-peers"]) {
    const peerJobs = Math.min(tasks, 20_000);
    log(`graphile-worker: ${peerJobs} jobs`);
    peers.push(await measureGraphileWorker({ databaseUrl: url, jobs: peerJobs, maxSeconds: seconds, log }));
    log(`pg-boss: ${peerJobs} jobs`);
    peers.push(await measurePgBoss({ databaseUrl: url, jobs: peerJobs, maxSeconds: seconds, log }));
  }
  const rows: [string, string, string, string][] = [
    ["system", "work", "per second", "notes"],
    ["stepbroker", `${one.steps} one-step tasks`, String(one.stepsPerSecond), "1 Node pool over tcp, capacity 256"],
    [
      "stepbroker",
      `${diamond.steps} steps in diamonds`,
      String(diamond.stepsPerSecond),
      `parent commit -> child at pool: p50 ${diamond.latencyP50Ms} ms, p99 ${diamond.latencyP99Ms} ms`,
    ],
    [
      "stepbroker",
      `${lone.steps} steps, one diamond at a time`,
      String(lone.stepsPerSecond),
      `parent commit -> child at pool: p50 ${lone.latencyP50Ms} ms, p99 ${lone.latencyP99Ms} ms`,
    ],
    ...peers.map((p): [string, string, string, string] => [`${p.name} ${p.version}`, `${p.jobs} jobs`, String(p.jobsPerSecond), p.settings]),
  ];
  const widths = [0, 1, 2].map((i) => Math.max(...rows.map((r) => r[i]!.length)));
  const text = rows.map((r) => r.map((c, i) => (i < 3 ? c.padEnd(widths[i]!) : c)).join("  ")).join("\n");
  process.stdout.write(`\n${text}\n`);
  for (const p of peers) process.stdout.write(`stepbroker one-step / ${p.name}: ${(one.stepsPerSecond / p.jobsPerSecond).toFixed(1)}x\n`);
  if (values.json) process.stdout.write(JSON.stringify({ stepbroker: { one_step: one, diamond, diamond_one_at_a_time: lone }, peers, cores: os.cpus().length }) + "\n");
} finally {
  await server?.stop();
  if (dir) await fs.rm(dir, { recursive: true, force: true });
}
