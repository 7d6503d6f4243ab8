/** Helpers shared by the peer benchmarks. */
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import { cpuPerUnit } from "../harness";
import type { PeerResult } from "./types";

const require = createRequire(import.meta.url);

/**
 * Starts the CPU clocks of a timed drain (this process's, where the peer's
 * worker runs, and the server's when `serverCpu` can read it); the returned
 * function reads them, per job, at the drain's end.
 */
export function startCpuClocks(
  serverCpu: (() => number | undefined) | undefined,
): (jobs: number) => Pick<PeerResult, "nodeCpuMicrosPerJob" | "serverCpuMicrosPerJob"> {
  const node = process.cpuUsage();
  const server = serverCpu?.();
  return (jobs) => {
    const used = process.cpuUsage(node);
    const nodeCpu = cpuPerUnit(0, used.user + used.system, jobs);
    const serverCpuUsed = cpuPerUnit(server, serverCpu?.(), jobs);
    return {
      ...(nodeCpu !== undefined ? { nodeCpuMicrosPerJob: nodeCpu } : {}),
      ...(serverCpuUsed !== undefined ? { serverCpuMicrosPerJob: serverCpuUsed } : {}),
    };
  };
}

/** The installed version of a package, read from its package.json. */
export function installedVersion(pkg: string): string {
  try {
    let dir = path.dirname(require.resolve(pkg));
    for (;;) {
      try {
        const json = JSON.parse(readFileSync(path.join(dir, "package.json"), "utf8")) as {
          name?: string;
          version?: string;
        };
        if (json.name === pkg && typeof json.version === "string") return json.version;
      } catch {
        // no package.json here; keep walking up
      }
      const parent = path.dirname(dir);
      if (parent === dir) return "unknown";
      dir = parent;
    }
  } catch {
    return "unknown";
  }
}

export const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** Double-quotes a SQL identifier. */
export function quoteIdent(name: string): string {
  return `"${name.replace(/"/g, '""')}"`;
}

/**
 * Jobs the peer's handlers have run, counted in-process, so a drain is not
 * timed by polling the jobs table: a count(*) of 100,000 rows every few
 * milliseconds would be load on the very server the peer is measured on.
 * The first handler call starts the clock, as stepbroker's first commit does.
 */
export class JobCounter {
  handled = 0;
  firstAt: number | undefined;
  add(n: number): void {
    this.firstAt ??= performance.now();
    this.handled += n;
  }
}

export interface DrainOutcome {
  /** Jobs completed when the wait stopped. */
  completed: number;
  /** Seconds from the first handler call to the poll that saw the queue empty (or to the bound). */
  seconds: number;
  /** True when `maxSeconds` passed before every job completed. */
  timedOut: boolean;
}

/**
 * Waits until every job is handled (in-process) and then until the table
 * says none is left (`remaining()`, a count of jobs not yet completed, polled
 * only from then on, so the peer's last batched completions are included), or
 * until `maxSeconds` after `boundFrom` (a performance.now() value).
 */
export async function waitForDrain(opts: {
  total: number;
  maxSeconds: number;
  boundFrom: number;
  counter: JobCounter;
  remaining: () => Promise<number>;
  pollMs: number;
  log: (line: string) => void;
  label: string;
}): Promise<DrainOutcome> {
  const deadline = opts.boundFrom + opts.maxSeconds * 1000;
  let lastLog = opts.boundFrom;
  const since = () => (performance.now() - (opts.counter.firstAt ?? opts.boundFrom)) / 1000;
  for (;;) {
    const now = performance.now();
    if (opts.counter.handled >= opts.total) {
      const left = await opts.remaining();
      if (left <= 0) return { completed: opts.total, seconds: since(), timedOut: false };
      if (performance.now() >= deadline) {
        return { completed: opts.total - left, seconds: since(), timedOut: true };
      }
    } else if (now >= deadline) {
      const left = await opts.remaining();
      return { completed: opts.total - left, seconds: since(), timedOut: true };
    }
    if (now - lastLog >= 2000) {
      lastLog = now;
      opts.log(`${opts.label}: ${opts.counter.handled}/${opts.total} handled after ${since().toFixed(1)}s`);
    }
    await sleep(Math.min(opts.pollMs, Math.max(1, deadline - now)));
  }
}
