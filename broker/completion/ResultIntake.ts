/**
 * RESULT intake: each result is checked against who holds its attempt (a
 * pool may report only its own), taken out of flight (its credit comes back
 * and dispatch may send more while the commit runs) and queued for the group
 * commit. Results for attempts not in flight here (a broker restart, a lease
 * lost) are judged by what the database records.
 *
 * While the committer is full, a result's credit is not given back but
 * parked on it until it is stored, so a database that lags slows the pools
 * instead of letting results pile up in memory.
 */
import { BrokerCommands, type BodyOf } from "../../protocol";
import type { BrokerContext } from "../BrokerContext";
import type { InFlight, PoolRecord } from "../pools/PoolRegistry";
import { refuseForeign, type ForeignAttempt } from "../pools/refuseForeign";
import type { JsonValue, StepError } from "../state/types";
import type { AttemptResult } from "../StatePort";
import type { PendingResult } from "./Committer";

type ResultItem = BodyOf<"RESULT">["results"][number];

/** What intake needs of the committer. */
export interface ResultQueue {
  addAll(items: readonly PendingResult[]): void;
  readonly full: boolean;
  readonly pending: number;
  readonly bound: number;
}

export class ResultIntake {
  /** The committer was full at the last result: the log says so once per episode. */
  private parking = false;

  /**
   * `forgetDrained` forgets a draining pool once nothing of it is in flight;
   * `failed` reports a verb that failed (the database was away) to the pool and the log.
   */
  constructor(
    private readonly ctx: BrokerContext,
    private readonly committer: ResultQueue,
    private readonly forgetDrained: (pool: PoolRecord) => void,
    private readonly failed: (pool: PoolRecord, e: unknown) => void,
  ) {}

  accept(pool: PoolRecord, body: BodyOf<"RESULT">): void {
    const { ctx } = this;
    const now = Date.now();
    const unheld: ResultItem[] = [];
    // Handed to the committer together, before the kick below: one transaction for the message, and
    // its children's credit set aside before a dispatch round can take that credit for itself.
    const items: PendingResult[] = [];
    for (const r of body.results) {
      const holder = ctx.pools.holderOf(r.attempt_id);
      if (holder && holder !== pool) {
        // Nothing one pool sends may change another's steps.
        this.refuseForeignResults(pool, [
          { attemptId: r.attempt_id, owner: holder.poolId, flight: holder.inFlight.get(r.attempt_id) },
        ]);
        continue;
      }
      if (!holder) {
        // A cancelled handler returned after all: the slot it held is free.
        if (pool.lingering.has(r.attempt_id)) ctx.pools.noteLateResult(pool, r.attempt_id);
        unheld.push(r);
        continue;
      }
      this.queue(pool, r, now, ctx.pools.takeInFlight(r.attempt_id)?.flight, items);
    }
    this.committer.addAll(items);
    // Credit came back: more work can go out while the commit runs.
    ctx.kick(pool);
    if (unheld.length > 0) {
      // Not in flight here (a broker restart, a lease lost): the database knows whose it was.
      void this.acceptUnheld(pool, unheld, now).catch((e) => this.failed(pool, e));
    } else if (pool.draining && pool.inFlight.size === 0) this.forgetDrained(pool);
  }

  /** The committer has room again: credit flows back as results arrive. */
  noteDrained(): void {
    this.ctx.metrics.resultsAwaitingCommit(this.committer.pending);
    if (!this.parking || this.committer.full) return;
    this.parking = false;
    this.ctx.log.info(
      { pending: this.committer.pending, bound: this.committer.bound },
      `results awaiting commit are below the bound of ${this.committer.bound} again; credit flows back as results arrive`,
    );
  }

  private async acceptUnheld(pool: PoolRecord, results: ResultItem[], now: number): Promise<void> {
    const { ctx } = this;
    const foreign = await ctx.state.foreignAttempts(
      results.map((r) => r.attempt_id),
      pool.poolId,
    );
    const refused: ForeignAttempt[] = [];
    const items: PendingResult[] = [];
    for (const r of results) {
      const owner = foreign.get(r.attempt_id.toLowerCase());
      if (owner !== undefined) refused.push({ attemptId: r.attempt_id, owner });
      else this.queue(pool, r, now, undefined, items);
    }
    this.committer.addAll(items);
    this.refuseForeignResults(pool, refused);
    if (pool.draining && pool.inFlight.size === 0 && ctx.pools.isCurrent(pool)) this.forgetDrained(pool);
  }

  /** Another pool's attempts: acknowledged as stale (the sender forgets them), and refused by name. */
  private refuseForeignResults(pool: PoolRecord, attempts: ForeignAttempt[]): void {
    if (attempts.length === 0) return;
    const { ctx } = this;
    for (let i = 0; i < attempts.length; i += ctx.opts.maxBatch) {
      const acks = attempts
        .slice(i, i + ctx.opts.maxBatch)
        .map((a) => ({ attempt_id: a.attemptId, outcome: "stale" as const }));
      ctx.send(pool.identity, BrokerCommands.ACK, { acks }, pool.encoding);
    }
    refuseForeign(ctx, pool, "RESULT", attempts);
  }

  /** Builds the pending result onto `items`, which the caller hands to the committer. */
  private queue(
    pool: PoolRecord,
    r: ResultItem,
    now: number,
    flight: InFlight | undefined,
    items: PendingResult[],
  ): void {
    const { ctx } = this;
    ctx.pools.noteResultReceived(pool);
    const waiting = this.committer.pending + items.length;
    const parked = waiting >= this.committer.bound ? ctx.pools.reserve(pool, 1) : undefined;
    if (parked && !this.parking) {
      this.parking = true;
      ctx.log.warn(
        { pending: waiting, bound: this.committer.bound },
        `${waiting} results await commit (the bound is ${this.committer.bound}): ` +
          "each new result's credit is held until it is stored, so pools get no new work meanwhile; is the database slow?",
      );
    }
    ctx.metrics.resultsAwaitingCommit(waiting + 1);
    // Built by assignment rather than spreads of one-field objects: this runs for every result.
    const result: AttemptResult = { attemptId: r.attempt_id, status: r.status };
    // Validated against the schema on arrival, so it is plain JSON.
    if (r.status === "complete") result.output = (r.output ?? null) as JsonValue;
    if (r.error) result.error = r.error as StepError;
    if (r.duration_ms !== undefined) result.durationMs = r.duration_ms;
    if (r.usage) result.usage = r.usage;
    result.poolId = pool.poolId;
    const item: PendingResult = { poolKey: pool.key, identity: pool.identity, receivedAt: now, result };
    if (flight) item.flight = flight;
    if (parked) item.parked = parked;
    items.push(item);
  }
}
