/**
 * Where a process's CPU went, from a `node --cpu-prof` profile: time by
 * function and file, self (the function itself) or inclusive (with what it
 * called), optionally only between the first and the last sample whose stack
 * holds a given function, so start-up (module loading, schema compiling,
 * creating the tasks) stays out of a per-step figure.
 *   node --cpu-prof --cpu-prof-dir /tmp/prof/broker --import tsx bench/run.ts --quick ...   (the broker)
 *   BENCH_POOL_CPU_PROF=/tmp/prof/pool npm run bench -- --quick ...                         (the pool)
 *   node --import tsx bench/profileSummary.ts <file.cpuprofile> [--top 40] [--inclusive] [--window onSteps]
 */
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  children?: number[];
}

interface CpuProfile {
  nodes: ProfileNode[];
  samples: number[];
  timeDeltas: number[];
}

export interface ProfileRow {
  /** "function file:line", node_modules and the working directory shortened. */
  where: string;
  ms: number;
  /** Share of the window's samples, idle included. */
  percent: number;
}

export interface ProfileTotals {
  windowMs: number;
  /** The window less (idle). */
  busyMs: number;
  rows: ProfileRow[];
}

function label(n: ProfileNode, cwd: string): string {
  const url = n.callFrame.url.replace(`file://${cwd}/`, "").replace(/.*node_modules\//, "");
  return `${n.callFrame.functionName || "(anonymous)"} ${url}:${n.callFrame.lineNumber + 1}`;
}

export function summarizeProfile(
  profile: CpuProfile,
  opts: { inclusive?: boolean; window?: string; cwd?: string } = {},
): ProfileTotals {
  const cwd = opts.cwd ?? process.cwd();
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  const parent = new Map<number, number>();
  for (const n of profile.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  const stackHas = (id: number, fn: string): boolean => {
    for (let c: number | undefined = id; c !== undefined; c = parent.get(c))
      if (byId.get(c)?.callFrame.functionName === fn) return true;
    return false;
  };
  let lo = 0;
  let hi = profile.samples.length - 1;
  if (opts.window !== undefined) {
    const fn = opts.window;
    lo = profile.samples.findIndex((id) => stackHas(id, fn));
    if (lo < 0) throw new Error(`no sample has ${fn} on its stack`);
    while (hi > lo && !stackHas(profile.samples[hi]!, fn)) hi--;
  }
  const times = new Map<string, number>();
  let total = 0;
  let idle = 0;
  for (let i = lo; i <= hi; i++) {
    const id = profile.samples[i]!;
    const dt = profile.timeDeltas[i] ?? 0;
    total += dt;
    const leaf = byId.get(id)!;
    if (leaf.callFrame.functionName === "(idle)") idle += dt;
    if (!opts.inclusive) {
      const k = label(leaf, cwd);
      times.set(k, (times.get(k) ?? 0) + dt);
      continue;
    }
    // a recursive function counts once per sample
    const seen = new Set<string>();
    for (let c: number | undefined = id; c !== undefined; c = parent.get(c)) {
      const k = label(byId.get(c)!, cwd);
      if (seen.has(k)) continue;
      seen.add(k);
      times.set(k, (times.get(k) ?? 0) + dt);
    }
  }
  const rows = [...times]
    .sort((a, b) => b[1] - a[1])
    .map(([where, us]) => ({ where, ms: us / 1000, percent: total > 0 ? (100 * us) / total : 0 }));
  return { windowMs: total / 1000, busyMs: (total - idle) / 1000, rows };
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: { top: { type: "string" }, inclusive: { type: "boolean" }, window: { type: "string" } },
  });
  const file = positionals[0];
  if (file === undefined)
    throw new Error("usage: profileSummary.ts <file.cpuprofile> [--top N] [--inclusive] [--window fn]");
  const summary = summarizeProfile(JSON.parse(readFileSync(file, "utf8")) as CpuProfile, {
    ...(values.inclusive ? { inclusive: true } : {}),
    ...(values.window !== undefined ? { window: values.window } : {}),
  });
  process.stdout.write(
    `window ${summary.windowMs.toFixed(0)} ms, busy ${summary.busyMs.toFixed(0)} ms (${values.inclusive ? "inclusive" : "self"} time)\n`,
  );
  for (const r of summary.rows.slice(0, Number(values.top ?? 40)))
    process.stdout.write(
      `${r.ms.toFixed(1).padStart(9)} ms ${r.percent.toFixed(1).padStart(5)}%  ${r.where}\n`,
    );
}
