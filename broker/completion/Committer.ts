/**
 * Group commit. Results from every pool queue here; a flush loop hands all
 * that have arrived to the state manager in one transaction, so throughput is
 * bound by PostgreSQL round trips per batch, not per result. While a commit
 * runs, the next batch gathers by itself: no timer, no added latency when idle.
 * The results of one message are handed over together (addAll), so an idle
 * committer stores them in one transaction.
 *
 * Two kinds of failure, handled differently:
 *  - The database is unreachable or restarting: the batch is retried after a
 *    pause; its results are not acknowledged meanwhile, so the pools keep
 *    them. Nothing is dropped.
 *  - PostgreSQL refuses the data (a value jsonb cannot store that got past
 *    validation): retrying the same batch would fail forever and hold every
 *    other result behind it. The batch is split in halves, each committed on
 *    its own, down to the single result at fault; everything else is stored
 *    and acknowledged, and the bad result is stored as an error outcome of its
 *    attempt instead (or, if even that is refused, dropped), and the pool told.
 *
 * Two commits may be in flight (COMMIT_IN_FLIGHT), each on its own pooled
 * connection, so a result that arrives while one commits goes out at once
 * rather than waiting for it. Results are taken in arrival order, except
 * that a result whose attempt, or whose task, a commit in flight holds waits
 * in the queue until that commit is over: one attempt's copies are then
 * judged one commit after the other (the later is a duplicate, as with one
 * commit at a time), and two commits never wait on each other's task locks.
 * Each commit isolates its own data errors; a database failure pauses
 * both (the failed commit's results go back to the front of the queue).
 *
 * The queue has a bound (`full`): past it, the broker keeps the credit of each
 * new result's pool until that result is stored (ResultIntake), so pools stop
 * getting new work and results stop piling up while the database lags.
 */
import type { Logger } from "pino";
import { coerceError, StepErrorTypes } from "../../protocol";
import { codeOf, isDataError, reasonOf } from "../db/errors";
import { isolateDataErrors } from "../db/isolateDataErrors";
import type { InFlight, Reservation } from "../pools/PoolRegistry";
import type { AttemptResult } from "../StatePort";

export interface PendingResult {
  result: AttemptResult;
  /** The pool that sent it (ROUTER identity key), to address the ACK. */
  poolKey: string;
  identity: Buffer;
  receivedAt: number;
  /** What the broker knew of the attempt when it was in flight, for the log line. */
  flight?: InFlight;
  /** The pool's credit for this result, held while the committer was full; settled once it is stored or refused. */
  parked?: Reservation;
}

export interface CommitReport<Batch> {
  items: PendingResult[];
  batch: Batch;
  ms: number;
}

/** A result PostgreSQL would not store. `stored`: its attempt got the error outcome `UNSTORABLE_RESULT` instead. */
export interface RefusedResult {
  item: PendingResult;
  err: Error;
  /** What PostgreSQL said, through the wrappers: for the pool's ERROR and the stored error. */
  reason: string;
  stored: boolean;
}

/** The error type stored for an attempt whose own result PostgreSQL refused. */
export const UNSTORABLE_RESULT = StepErrorTypes.UNSTORABLE_RESULT;

/**
 * Commits in flight at most. A second lets a result skip the wait for the
 * commit already running; more would split the same results into smaller
 * transactions that contend for the same CPU and connections.
 */
export const COMMIT_IN_FLIGHT = 2;
const RETRY_MS = 500;
/** While the database stays away, one log line per this long, with a count, instead of one per retry. */
const RETRY_LOG_EVERY_MS = 30_000;

/** `commit` stores one batch in one transaction and says what came of it. */
export class Committer<Batch> {
  private queue: PendingResult[] = [];
  /** Flush loops running, each with at most one commit in flight. */
  private running = 0;
  /**
   * The batches of the commits in flight. Which attempts and tasks they hold is
   * gathered by take() when it needs to know (another commit is in flight), into
   * sets that die with that call: a set and a count per task kept for every
   * commit's whole run were, by a heap profile of a one-step run, a fifth of
   * what the broker's young generation promoted to the old one, churning hash
   * tables that lived just long enough to be copied.
   */
  private readonly batchesInFlight = new Set<PendingResult[]>();
  /** Set while pausing after a connection failure: no commit starts until it resolves. */
  private pausing: Promise<void> | undefined;
  private idleWaiters: (() => void)[] = [];
  private stopped = false;
  /** Set while pausing after a connection failure; stop() ends the pause early. */
  private endPause: (() => void) | undefined;
  private failures = 0;
  private failingSince = 0;
  private lastFailureLog = 0;

  constructor(
    private readonly commit: (items: PendingResult[]) => Promise<Batch>,
    private readonly maxBatch: number,
    private readonly onCommitted: (report: CommitReport<Batch>) => void,
    private readonly log: Logger,
    private readonly onRefused: (refused: RefusedResult) => void = () => undefined,
    /** Results queued at most before `full` says so (by default, four batches). */
    readonly bound: number = maxBatch * 4,
  ) {}

  get pending(): number {
    return this.queue.length;
  }

  /** As many results wait as the bound allows: the broker holds credit for new ones until they are stored. */
  get full(): boolean {
    return this.queue.length >= this.bound;
  }

  add(item: PendingResult): void {
    this.addAll([item]);
  }

  /**
   * Queues results that arrived together. An idle committer starts at once,
   * with all of them in one transaction: the results of one RESULT message
   * added one at a time had the first committed alone, so a diamond's two
   * parents, sent together, took two commits in a row.
   */
  addAll(items: readonly PendingResult[]): void {
    if (items.length === 0) return;
    for (const item of items) this.queue.push(item);
    if (this.running < COMMIT_IN_FLIGHT) void this.flushLoop();
  }

  /**
   * Resolves when every queued result has been committed, when the committer
   * stopped, or when commits are failing for want of a database: waiting then
   * could last forever, and the pools keep those results until ACK anyway.
   */
  idle(): Promise<void> {
    if ((this.running === 0 && this.queue.length === 0) || this.endPause) return Promise.resolve();
    return new Promise((r) => this.idleWaiters.push(r));
  }

  stop(): void {
    this.stopped = true;
    this.endPause?.();
    this.wake();
  }

  private wake(): void {
    const w = this.idleWaiters;
    this.idleWaiters = [];
    for (const f of w) f();
  }

  private async flushLoop(): Promise<void> {
    this.running++;
    try {
      for (let items = this.take(); items.length > 0; items = this.take()) {
        let left: { items: PendingResult[]; err: Error } | undefined;
        try {
          left = await this.commitIsolating(items);
        } finally {
          this.release(items);
        }
        if (!left) {
          this.recovered();
          continue;
        }
        this.queue.unshift(...left.items);
        this.failed(left.err, left.items.length);
        if (this.stopped) break;
        await this.pause();
        if (this.stopped) break;
      }
    } finally {
      this.running--;
      if (this.running === 0) this.wake();
    }
  }

  /**
   * The next commit's results, in arrival order, leaving queued those whose
   * attempt or task a commit in flight holds (they go once it is over, in
   * their order); nothing while the committer pauses for the database.
   */
  private take(): PendingResult[] {
    if (this.pausing) return [];
    let items: PendingResult[];
    if (this.batchesInFlight.size === 0) items = this.queue.splice(0, this.maxBatch);
    else {
      const heldAttempts = new Set<string>();
      const heldTasks = new Set<string>();
      for (const batch of this.batchesInFlight) {
        for (const item of batch) {
          heldAttempts.add(item.result.attemptId);
          const taskId = item.flight?.taskId;
          if (taskId !== undefined) heldTasks.add(taskId);
        }
      }
      items = [];
      const left: PendingResult[] = [];
      for (const item of this.queue) {
        const taskId = item.flight?.taskId;
        const held =
          heldAttempts.has(item.result.attemptId) || (taskId !== undefined && heldTasks.has(taskId));
        if (!held && items.length < this.maxBatch) items.push(item);
        else left.push(item);
      }
      this.queue = left;
    }
    if (items.length > 0) this.batchesInFlight.add(items);
    return items;
  }

  private release(items: PendingResult[]): void {
    this.batchesInFlight.delete(items);
  }

  /**
   * Commits `items`, halving on data errors down to single results. Returns
   * the results still uncommitted (in order) when the database failed, or
   * undefined when every result was dealt with.
   */
  private async commitIsolating(
    items: PendingResult[],
  ): Promise<{ items: PendingResult[]; err: Error } | undefined> {
    const stop = await isolateDataErrors(items, {
      run: async (part) => {
        const started = performance.now();
        const batch = await this.commit(part);
        this.onCommitted({ items: part, batch, ms: performance.now() - started });
      },
      halving: (part, err) =>
        this.log.warn(
          { err, results: part.length },
          `PostgreSQL refused a batch of ${part.length} results (${codeOf(err)}); committing it in halves to find the result at fault`,
        ),
      single: (item, err) => this.refuse(item, err),
    });
    return stop && { items: [...stop.part, ...stop.rest], err: stop.err };
  }

  /**
   * One result PostgreSQL will not store: store an error outcome for its
   * attempt instead, so the step follows its retry policy now rather than when
   * the lease runs out. Returns an error only when the database itself failed
   * meanwhile (the caller keeps the result and retries later).
   */
  private async refuse(item: PendingResult, err: Error): Promise<Error | undefined> {
    const { result } = item;
    const replacement: PendingResult = {
      ...item,
      result: {
        attemptId: result.attemptId,
        status: "error",
        error: {
          type: UNSTORABLE_RESULT,
          message: `PostgreSQL refused to store this attempt's ${result.status} result (${reasonOf(err)}); it is stored as this error instead`,
          retryable: true,
        },
        ...(result.durationMs !== undefined ? { durationMs: result.durationMs } : {}),
        ...(result.poolId !== undefined ? { poolId: result.poolId } : {}),
      },
    };
    const started = performance.now();
    try {
      const batch = await this.commit([replacement]);
      this.onCommitted({ items: [replacement], batch, ms: performance.now() - started });
      this.onRefused({ item, err, reason: reasonOf(err), stored: true });
    } catch (e) {
      if (!isDataError(e)) return coerceError(e);
      this.onRefused({ item, err: coerceError(e), reason: reasonOf(e), stored: false });
    }
    return undefined;
  }

  /** Waits RETRY_MS (or until stop()); a commit failing meanwhile waits for the same pause. */
  private pause(): Promise<void> {
    this.pausing ??= new Promise<void>((resolve) => {
      const done = (): void => {
        clearTimeout(timer);
        this.endPause = undefined;
        this.pausing = undefined;
        resolve();
      };
      const timer = setTimeout(done, RETRY_MS);
      this.endPause = done;
      // Whoever waits for the committer to be idle would wait for the database: let them go.
      this.wake();
    });
    return this.pausing;
  }

  private failed(err: Error, results: number): void {
    const now = Date.now();
    this.failures++;
    if (this.failures === 1) {
      this.failingSince = now;
      this.lastFailureLog = now;
      this.log.error(
        { err, results },
        `could not commit ${results} results; retrying every ${RETRY_MS} ms (the pools keep them until ACK)`,
      );
    } else if (now - this.lastFailureLog >= RETRY_LOG_EVERY_MS) {
      this.lastFailureLog = now;
      this.log.error(
        { err, results, failures: this.failures, seconds: Math.round((now - this.failingSince) / 1000) },
        `still cannot commit ${results} results: ${this.failures} attempts failed over ${Math.round((now - this.failingSince) / 1000)} s; retrying every ${RETRY_MS} ms`,
      );
    }
  }

  private recovered(): void {
    if (this.failures === 0) return;
    this.log.info(
      { failures: this.failures, seconds: Math.round((Date.now() - this.failingSince) / 1000) },
      `commits resumed after ${this.failures} failed attempts over ${Math.round((Date.now() - this.failingSince) / 1000)} s`,
    );
    this.failures = 0;
  }
}
