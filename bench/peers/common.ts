/** Helpers shared by the peer benchmarks. */
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(import.meta.url);

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

export interface DrainOutcome {
  /** Jobs completed when polling stopped. */
  completed: number;
  /** Seconds from `startedAt` to the poll that saw the queue empty (or to the bound). */
  seconds: number;
  /** True when `maxSeconds` passed before every job completed. */
  timedOut: boolean;
}

/**
 * Polls `remaining()` (a cheap count of jobs not yet completed) until it is 0
 * or `maxSeconds` have passed since `startedAt` (a performance.now() value).
 */
export async function waitForDrain(opts: {
  total: number;
  maxSeconds: number;
  startedAt: number;
  remaining: () => Promise<number>;
  pollMs: number;
  log: (line: string) => void;
  label: string;
}): Promise<DrainOutcome> {
  const deadline = opts.startedAt + opts.maxSeconds * 1000;
  let lastLog = opts.startedAt;
  for (;;) {
    const left = await opts.remaining();
    const now = performance.now();
    if (left <= 0) {
      return { completed: opts.total, seconds: (now - opts.startedAt) / 1000, timedOut: false };
    }
    if (now >= deadline) {
      return { completed: opts.total - left, seconds: (now - opts.startedAt) / 1000, timedOut: true };
    }
    if (now - lastLog >= 2000) {
      lastLog = now;
      opts.log(
        `${opts.label}: ${opts.total - left}/${opts.total} done after ${((now - opts.startedAt) / 1000).toFixed(1)}s`,
      );
    }
    await sleep(Math.min(opts.pollMs, Math.max(1, deadline - now)));
  }
}
