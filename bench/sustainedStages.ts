/**
 * The sustained runs with their per-stage split (recordStages): the saturated
 * rate once, then each fraction of it, printed as JSON.
 *   node --import tsx bench/sustainedStages.ts [fraction ...]   (default 0.5 0.9)
 * A number above 1 is a rate in tasks/s; when all are, the saturated run is skipped.
 */
import { readFileSync, readdirSync } from "node:fs";
import path from "node:path";
import { openBenchDatabase } from "./harness";
import { measureSaturated, measureSustained } from "./sustained";

const given = process.argv.slice(2).map(Number);
const fractions = given.length > 0 ? given : [0.5, 0.9];
let dataDir = "";
const db = await openBenchDatabase(
  (line) => console.error(line),
  (dir) => (dataDir = path.join(dir, "pgdata")),
);

/** CPU ticks (user + system) so far of each child of the embedded postmaster: its backends and workers. */
function postgresTicks(): Map<number, number> {
  const out = new Map<number, number>();
  if (dataDir === "") return out;
  const postmaster = Number(readFileSync(path.join(dataDir, "postmaster.pid"), "utf8").split("\n")[0]);
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const stat = readFileSync(`/proc/${name}/stat`, "utf8");
      const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      if (Number(f[1]) === postmaster) out.set(Number(name), Number(f[11]) + Number(f[12]));
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

/**
 * The CPU the broker process (with the bench's client) and PostgreSQL used
 * from `fromMs` to `toMs` after now, sampled every 200 ms, per task submitted
 * at `rate`: at a lower rate the stages run more, smaller statements, and
 * this shows what each task then costs.
 */
function sampleCpu(fromMs: number, toMs: number, rate: number): Promise<Record<string, number>> {
  return new Promise((resolve) => {
    const first = new Map<number, number>();
    const last = new Map<number, number>();
    let broker0 = process.cpuUsage();
    const t0 = performance.now();
    const timer = setInterval(() => {
      const at = performance.now() - t0;
      if (at < fromMs) {
        broker0 = process.cpuUsage();
        return;
      }
      for (const [pid, ticks] of postgresTicks()) {
        if (!first.has(pid)) first.set(pid, ticks);
        last.set(pid, ticks);
      }
      if (at < toMs) return;
      clearInterval(timer);
      const broker = process.cpuUsage(broker0);
      let ticks = 0;
      for (const [pid, t] of last) ticks += t - first.get(pid)!;
      const seconds = (at - fromMs) / 1000;
      const tasks = rate * seconds;
      resolve({
        brokerCpuPerTaskUs: Math.round((broker.user + broker.system) / tasks),
        postgresCpuPerTaskUs: Math.round((ticks * 10_000) / tasks),
        brokerCores: Math.round(((broker.user + broker.system) / 1e6 / seconds) * 100) / 100,
        postgresCores: Math.round((ticks / 100 / seconds) * 100) / 100,
      });
    }, 200);
  });
}
try {
  const saturated = fractions.every((f) => f > 1)
    ? { tasksPerSecond: 1 }
    : await measureSaturated({
        databaseUrl: db.url,
        inFlight: 256,
        seconds: 10,
        warmupSeconds: 3,
        capacity: 2048,
      });
  console.log(JSON.stringify({ saturated }));
  for (const fraction of fractions) {
    const rate = fraction > 1 ? fraction : Math.max(1, Math.round(saturated.tasksPerSecond * fraction));
    const cpu = sampleCpu(3_500, 12_500, rate);
    const r = await measureSustained({
      databaseUrl: db.url,
      rate,
      seconds: 10,
      warmupSeconds: 3,
      capacity: 2048,
      stages: true,
      log: (line) => console.error(line),
    });
    console.log(JSON.stringify({ fraction, ...r, cpu: await cpu }, null, 1));
  }
} finally {
  await db.close();
}
