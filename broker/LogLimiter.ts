/**
 * Rate-limits log lines by key (a peer, or a kind of failure): at most
 * `lines` per key per interval, then one summary line with the count of what
 * was left out. A peer that sends garbage as fast as it can would otherwise
 * write the log as fast as it can (20,000 ERRORs once wrote 168 MB in 3.7 s),
 * and a failure that repeats for every request (the database is down) would
 * bury everything else.
 *
 * Memory is bounded: a key is forgotten once its interval ended and its
 * summary was written, and at most `maxKeys` keys are tracked (the oldest is
 * summarized and forgotten to make room).
 */
import type { Logger } from "pino";

export type LimitedLevel = "info" | "warn" | "error";

export interface LogLimiterOptions {
  /** Lines written per key per interval before the rest are only counted. */
  lines?: number;
  intervalMs?: number;
  /** Keys tracked at once. */
  maxKeys?: number;
  now?: () => number;
}

export const LOG_LINES_PER_INTERVAL = 5;
export const LOG_INTERVAL_MS = 10_000;
export const LOG_LIMITER_MAX_KEYS = 10_000;

interface Window {
  start: number;
  written: number;
  suppressed: number;
  level: LimitedLevel;
  /** Who or what the summary names, e.g. `from peer "abc"`. */
  subject: string;
  /** Fields carried by the summary line (peer, pool_id, ...), those of the first line of the window. */
  fields: Record<string, unknown>;
}

export class LogLimiter {
  private readonly log: Logger;
  private readonly lines: number;
  private readonly intervalMs: number;
  private readonly maxKeys: number;
  private readonly now: () => number;
  private readonly windows = new Map<string, Window>();

  constructor(log: Logger, opts: LogLimiterOptions = {}) {
    this.log = log;
    this.lines = opts.lines ?? LOG_LINES_PER_INTERVAL;
    this.intervalMs = opts.intervalMs ?? LOG_INTERVAL_MS;
    this.maxKeys = opts.maxKeys ?? LOG_LIMITER_MAX_KEYS;
    this.now = opts.now ?? Date.now;
  }

  /** Keys tracked now (for tests of the memory bound). */
  get size(): number {
    return this.windows.size;
  }

  /**
   * Writes the line unless `key` used up its lines in this interval; returns
   * whether it was written. `subject` names the key in the summary line.
   */
  write(
    key: string,
    subject: string,
    level: LimitedLevel,
    fields: Record<string, unknown>,
    msg: string,
    opts: { lines?: number } = {},
  ): boolean {
    const now = this.now();
    let w = this.windows.get(key);
    if (w !== undefined && now - w.start >= this.intervalMs) {
      this.summarize(w);
      this.windows.delete(key);
      w = undefined;
    }
    if (w === undefined) {
      if (this.windows.size >= this.maxKeys) this.evictOldest();
      w = { start: now, written: 0, suppressed: 0, level, subject, fields };
      this.windows.set(key, w);
    }
    if (w.written < (opts.lines ?? this.lines)) {
      w.written++;
      this.emit(level, fields, msg);
      return true;
    }
    w.suppressed++;
    return false;
  }

  /** Writes the summaries of intervals that ended and forgets their keys; call it from a timer. */
  sweep(): void {
    const now = this.now();
    for (const [key, w] of this.windows) {
      if (now - w.start < this.intervalMs) continue;
      this.summarize(w);
      this.windows.delete(key);
    }
  }

  /** Writes every pending summary (at shutdown). */
  flush(): void {
    for (const w of this.windows.values()) this.summarize(w);
    this.windows.clear();
  }

  /**
   * An error's stack is for whoever debugs, not for the operator reading a
   * repeated failure: the line carries the error's type, message and code,
   * and the stack goes to a debug line beside it.
   */
  private emit(level: LimitedLevel, fields: Record<string, unknown>, msg: string): void {
    const err = fields.err;
    if (!(err instanceof Error)) {
      this.log[level](fields, msg);
      return;
    }
    const { err: _err, ...rest } = fields;
    const code = (err as { code?: unknown }).code;
    this.log[level](
      { ...rest, error: { type: err.name, message: err.message, ...(code !== undefined ? { code } : {}) } },
      msg,
    );
    if (this.log.isLevelEnabled("debug")) this.log.debug({ ...rest, err }, `${msg} (stack)`);
  }

  private evictOldest(): void {
    // A Map iterates in insertion order: the first key is the oldest window.
    for (const [key, w] of this.windows) {
      this.summarize(w);
      this.windows.delete(key);
      return;
    }
  }

  private summarize(w: Window): void {
    if (w.suppressed === 0) return;
    const seconds = Math.round(Math.max(this.now() - w.start, 1) / 100) / 10;
    this.emit(
      w.level,
      { ...w.fields, suppressed: w.suppressed },
      `suppressed ${w.suppressed} similar lines ${w.subject} in the last ${Math.min(seconds, this.intervalMs / 1000)} s`,
    );
  }
}
