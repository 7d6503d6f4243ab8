/**
 * Log lines about refused peers, at most one per key (a peer address, or a
 * listener and reason) per interval. A peer that reconnects in a loop with a
 * bad key would otherwise write a line every 100 ms for as long as it runs;
 * the next line for that key says how many were suppressed meanwhile.
 * Memory is bounded: at most `maxKeys` keys are remembered, the oldest
 * forgotten first.
 */
import type { Logger } from "pino";

interface Window {
  since: number;
  suppressed: number;
}

export class RefusalLog {
  private readonly windows = new Map<string, Window>();

  constructor(
    private readonly log: Logger,
    private readonly intervalMs: number,
    private readonly maxKeys = 4096,
  ) {}

  warn(key: string, fields: Record<string, unknown>, message: string): void {
    const now = Date.now();
    const w = this.windows.get(key);
    if (w && now - w.since < this.intervalMs) {
      w.suppressed++;
      return;
    }
    const suppressed = w?.suppressed ?? 0;
    // Re-inserting keeps the map in order of last log line, so the first key is the stalest.
    this.windows.delete(key);
    if (this.windows.size >= this.maxKeys) this.windows.delete(this.windows.keys().next().value!);
    this.windows.set(key, { since: now, suppressed: 0 });
    this.log.warn(
      { ...fields, ...(suppressed > 0 ? { suppressed } : {}) },
      suppressed > 0 ? `${message} (${suppressed} more like it suppressed)` : message,
    );
  }
}
