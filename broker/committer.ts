/**
 * Group commit. Results from every pool queue here; one flush loop hands all
 * that have arrived to the state manager in one transaction, so throughput is
 * bound by PostgreSQL round trips per batch, not per result. While a commit
 * runs, the next batch gathers by itself: no timer, no added latency when idle.
 *
 * A batch that fails to commit (the database is restarting, say) is retried
 * after a pause; its results are not acknowledged meanwhile, so the pools
 * keep them. Nothing is dropped.
 */
import type { Logger } from "pino";
import { coerceError } from "../protocol";
import type { InFlight } from "./poolRegistry";
import type { AttemptResult } from "./statePort";

export interface PendingResult {
  result: AttemptResult;
  /** The pool that sent it (ROUTER identity key), to address the ACK. */
  poolKey: string;
  identity: Buffer;
  receivedAt: number;
  /** What the broker knew of the attempt when it was in flight, for the log line. */
  flight?: InFlight;
}

export interface CommitReport<Batch> {
  items: PendingResult[];
  batch: Batch;
  ms: number;
}

const RETRY_MS = 500;

/** `commit` stores one batch in one transaction and says what came of it. */
export class Committer<Batch> {
  private queue: PendingResult[] = [];
  private running = false;
  private idleWaiters: (() => void)[] = [];
  private stopped = false;

  constructor(
    private readonly commit: (items: PendingResult[]) => Promise<Batch>,
    private readonly maxBatch: number,
    private readonly onCommitted: (report: CommitReport<Batch>) => void,
    private readonly log: Logger,
  ) {}

  get pending(): number {
    return this.queue.length;
  }

  add(item: PendingResult): void {
    this.queue.push(item);
    if (!this.running) void this.flushLoop();
  }

  /** Resolves when every queued result has been committed (or the committer stopped). */
  idle(): Promise<void> {
    if (!this.running && this.queue.length === 0) return Promise.resolve();
    return new Promise((r) => this.idleWaiters.push(r));
  }

  stop(): void {
    this.stopped = true;
    this.wake();
  }

  private wake(): void {
    const w = this.idleWaiters;
    this.idleWaiters = [];
    for (const f of w) f();
  }

  private async flushLoop(): Promise<void> {
    this.running = true;
    try {
      while (this.queue.length > 0) {
        const items = this.queue.splice(0, this.maxBatch);
        const started = performance.now();
        try {
          const batch = await this.commit(items);
          this.onCommitted({ items, batch, ms: performance.now() - started });
        } catch (e) {
          const err = coerceError(e);
          this.log.error(
            { err, results: items.length },
            `could not commit ${items.length} results; retrying in ${RETRY_MS} ms (the pools keep them until ACK)`,
          );
          this.queue.unshift(...items);
          if (this.stopped) break;
          await new Promise((r) => setTimeout(r, RETRY_MS));
        }
      }
    } finally {
      this.running = false;
      this.wake();
    }
  }
}
