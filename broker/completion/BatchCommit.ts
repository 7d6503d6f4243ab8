/**
 * One group commit and what follows it. `store` hands a batch of results to
 * the state manager in one transaction; when they may make children ready,
 * as much of one pool's credit as there are such children is reserved and
 * the same transaction claims the children for that pool
 * (sql/functions/complete_results.sql), so a child reaches a pool without a
 * second trip to the database. `committed` then sends those children, ACKs
 * every result to its pool, grows the windows of pools that proved
 * themselves, and wakes dispatch, retries' timers and the waiters of tasks
 * that finished. `refused` tells a pool that PostgreSQL would not store one
 * of its results.
 */
import { BrokerCommands, fault, faultToErrorBody, PoolCommands } from "../../protocol";
import type { BrokerContext } from "../BrokerContext";
import type { Dispatcher } from "../dispatch/Dispatcher";
import { NO_TRACES } from "../metrics/TraceSink";
import type { PoolRecord, Reservation } from "../pools/PoolRegistry";
import type { CompletionResult } from "../StatePort";
import type { AttemptOutcome } from "../state/types";
import { isDataError } from "../db/errors";
import { UNSTORABLE_RESULT, type CommitReport, type PendingResult, type RefusedResult } from "./Committer";

/** What one group commit stored; with `claim`, the credit set aside for the children it claimed. */
export interface CommittedBatch {
  result: CompletionResult;
  claim?: Reservation;
}

type AckOutcome = "stored" | "duplicate" | "stale" | "unknown";

export class BatchCommit {
  /**
   * `finished` is told of each task the batch ended; `drained` that the
   * committer may have room again.
   */
  constructor(
    private readonly ctx: BrokerContext,
    private readonly dispatcher: Pick<Dispatcher, "canSendTo" | "sendSteps">,
    private readonly finished: (taskId: string, state: string) => void,
    private readonly drained: () => void,
  ) {}

  async store(items: PendingResult[]): Promise<CommittedBatch> {
    const { ctx } = this;
    const results = items.map((i) => i.result);
    const claimFor = this.childClaimPool(items);
    if (!claimFor)
      return {
        result: await ctx.state.completeAttempts(results).catch((e: unknown) => {
          if (!isDataError(e)) ctx.metrics.dbError();
          throw e;
        }),
      };
    const { pool, limit } = claimFor;
    // Held until `committed` has put the claimed children in flight, so no dispatch claims against it.
    const claim = ctx.pools.reserve(pool, limit);
    let result: CompletionResult;
    try {
      result = await ctx.state.completeAttempts(results, {
        brokerId: ctx.id,
        poolId: pool.poolId,
        handlers: [...pool.handlers],
        limit,
      });
    } catch (e) {
      claim.settle();
      if (!isDataError(e)) ctx.metrics.dbError();
      throw e;
    }
    if (result.claimed.length > 0 && !this.dispatcher.canSendTo(pool)) {
      claim.settle();
      // Given back here, not later, so that stop() (which waits for the committer) waits for it too.
      await ctx.release(
        result.claimed.map((c) => c.attempt_id),
        false,
        "pool left before its children were sent",
      );
      return { result: { ...result, claimed: [] } };
    }
    return { result, claim };
  }

  committed({ items, batch: { result: batch, claim }, ms }: CommitReport<CommittedBatch>): void {
    const { ctx } = this;
    if (claim) {
      // The children first: they wait on this, the ACKs only free the pool's memory.
      const { pool, credit } = claim;
      try {
        if (batch.claimed.length > 0 && !this.dispatcher.sendSteps(pool, batch.claimed)) {
          void ctx.release(
            batch.claimed.map((c) => c.attempt_id),
            false,
            "pool left before its children were sent",
          );
        }
      } finally {
        claim.settle();
      }
      // A dispatch round that found this credit set aside may have left work behind.
      if (batch.claimed.length < credit) ctx.kick(pool);
    }
    // Outcomes come one per result in the order given (CompletionResult), so each item's is the one
    // at its own index; a map of them (one pair array and entry per result, per batch) is built
    // only should the two ever disagree.
    const { outcomes } = batch;
    let byAttempt: Map<string, AttemptOutcome> | undefined;
    const outcomeOf = (item: PendingResult, k: number): AttemptOutcome | undefined => {
      const o = outcomes[k];
      if (o !== undefined && o.attemptId === item.result.attemptId) return o;
      byAttempt ??= new Map(outcomes.map((x) => [x.attemptId, x]));
      return byAttempt.get(item.result.attemptId);
    };
    ctx.metrics.commitBatch(items.length, ms);
    const now = Date.now();
    const acks = new Map<string, { identity: Buffer; acks: { attempt_id: string; outcome: AckOutcome }[] }>();
    // Pools whose slow-start window grew: that credit is new, and no result will ask for it.
    const grown = new Set<PoolRecord>();
    for (let k = 0; k < items.length; k++) {
      const item = items[k]!;
      item.parked?.settle();
      const judged = outcomeOf(item, k);
      const outcome = judged?.outcome ?? "unknown";
      let entry = acks.get(item.poolKey);
      if (!entry) acks.set(item.poolKey, (entry = { identity: item.identity, acks: [] }));
      entry.acks.push({ attempt_id: item.result.attemptId, outcome });
      const pool = ctx.pools.get(item.poolKey);
      if (pool) ctx.pools.noteResultAcked(pool);
      if (pool && outcome === "stored") {
        if (pool.window < pool.capacity) grown.add(pool);
        ctx.pools.noteStored(pool);
      }
      if (outcome === "stored") {
        this.countOutcome(item, pool?.poolId, judged?.state === "ready");
        this.traceOutcome(item, pool?.poolId, now);
      }
      this.logOutcome(item, outcome, pool?.poolId);
    }
    for (const [poolKey, { identity, acks: list }] of acks) {
      const encoding = ctx.pools.get(poolKey)?.encoding ?? "json";
      for (let i = 0; i < list.length; i += ctx.opts.maxBatch) {
        ctx.send(identity, BrokerCommands.ACK, { acks: list.slice(i, i + ctx.opts.maxBatch) }, encoding);
      }
    }
    ctx.log.debug(
      { results: items.length, ms: Math.round(ms * 10) / 10 },
      `committed ${items.length} results`,
    );
    this.drained();
    if (batch.readied.length > 0) ctx.kick();
    for (const pool of grown) ctx.kick(pool);
    // Parked credit came back: pools that waited for it may take work again.
    for (const item of items) if (item.parked) ctx.kick(item.parked.pool);
    for (const r of batch.readied) ctx.kickAt(Date.parse(r.runAt));
    for (const t of batch.finishedTasks) this.finished(t.taskId, t.state);
  }

  /**
   * PostgreSQL refused one result that got past validation. The committer has
   * stored an error outcome for its attempt instead (the ACK went out with
   * it) or, failing that, dropped it: the pool hears why, by attempt_id.
   */
  refused({ item, err, reason, stored }: RefusedResult): void {
    const { ctx } = this;
    const { result, flight } = item;
    const pool = ctx.pools.get(item.poolKey);
    item.parked?.settle();
    const step = flight ? `step ${flight.stepName}` : "its step";
    const what = stored
      ? `stored error ${UNSTORABLE_RESULT} for the attempt instead; ${step} is retried by its policy`
      : `could not store an error for it either; dropped it, and ${step} is retried when the lease expires`;
    ctx.log.error(
      {
        err,
        task_id: flight?.taskId,
        step_id: flight?.stepId,
        attempt_id: result.attemptId,
        pool_id: pool?.poolId ?? result.poolId,
      },
      `PostgreSQL refused the ${result.status} result of attempt ${result.attemptId}; ${what}. Fix the handler's output`,
    );
    const encoding = pool?.encoding ?? "json";
    ctx.send(
      item.identity,
      BrokerCommands.ERROR,
      faultToErrorBody(
        fault("unstorable_value", `PostgreSQL refused the result (${reason}); ${what}`, {
          command: PoolCommands.RESULT,
        }),
        { attempt_id: result.attemptId },
      ),
      encoding,
    );
    if (!stored) {
      if (pool) ctx.pools.noteResultAcked(pool);
      ctx.send(
        item.identity,
        BrokerCommands.ACK,
        { acks: [{ attempt_id: result.attemptId, outcome: "stale" }] },
        encoding,
      );
    }
  }

  /**
   * The pool to claim a batch's children for, and how many children it may
   * take: of the pools that could run them, the one with the most free
   * credit. A pool that sent a parent's result likely serves the next steps,
   * and so does any pool serving every handler it serves; among those, a slow
   * pool (its credit taken by work in flight) leaves its children to a fast
   * one (credit free). Only pools that have had results stored are chosen. None
   * when no result has children, so one-step work never has credit held back.
   */
  private childClaimPool(items: PendingResult[]): { pool: PoolRecord; limit: number } | undefined {
    const { pools } = this.ctx;
    let children = 0;
    const senders = new Set<PoolRecord>();
    for (const item of items) {
      const n = item.result.status === "complete" ? (item.flight?.children ?? 0) : 0;
      if (n === 0) continue;
      children += n;
      const pool = pools.get(item.poolKey);
      if (pool) senders.add(pool);
    }
    if (senders.size === 0 || !this.ctx.isRunning()) return undefined;
    let best: PoolRecord | undefined;
    for (const sender of senders) if (!best || pools.credit(sender) > pools.credit(best)) best = sender;
    for (const pool of pools.all()) {
      if (pool.stored === 0 || pools.credit(pool) <= pools.credit(best!)) continue;
      if ([...senders].some((s) => servesAll(pool, s))) best = pool;
    }
    const limit = Math.min(children, pools.credit(best!));
    return limit > 0 ? { pool: best!, limit } : undefined;
  }

  private countOutcome(item: PendingResult, poolId: string | undefined, retried: boolean): void {
    const { metrics } = this.ctx;
    const handler = item.flight?.handler ?? "unknown";
    const pool = poolId ?? item.result.poolId ?? "unknown";
    metrics.attemptFinished(
      handler,
      pool,
      item.result.status === "complete" ? "complete" : "error",
      item.result.durationMs,
    );
    if (retried) metrics.stepsRetried(handler, pool);
  }

  /** The attempt as a span, from its dispatch to now (its result stored); only attempts this broker sent. */
  private traceOutcome(item: PendingResult, poolId: string | undefined, now: number): void {
    const { flight, result } = item;
    // Without an exporter (the default) the span object would be built per result for a no-op.
    if (!flight || flight.traceparent === undefined || this.ctx.traces === NO_TRACES) return;
    this.ctx.traces.attemptEnded({
      taskTraceparent: flight.traceparent,
      name: flight.stepName,
      startMs: flight.sentAt,
      endMs: now,
      taskId: flight.taskId,
      stepId: flight.stepId,
      attemptId: result.attemptId,
      handler: flight.handler,
      poolId: poolId ?? result.poolId ?? "unknown",
      outcome: result.status === "complete" ? "complete" : "error",
    });
  }

  /** One readable line per stored result: "completed step process_payment in 12 ms (attempt 1 of 3)". */
  private logOutcome(item: PendingResult, outcome: string, poolId: string | undefined): void {
    const { log } = this.ctx;
    const { result, flight } = item;
    // Checked first: at a level that is off, the fields and the text would be built per result for nothing.
    if (!log.isLevelEnabled(outcome !== "stored" || result.status === "complete" ? "info" : "warn")) return;
    const ids = {
      task_id: flight?.taskId,
      step_id: flight?.stepId,
      attempt_id: result.attemptId,
      pool_id: poolId,
    };
    const ms = result.durationMs !== undefined ? ` in ${Math.round(result.durationMs)} ms` : "";
    const step = flight ? `step ${flight.stepName}` : `attempt ${result.attemptId}`;
    const of = flight ? ` (attempt ${flight.attempt} of ${flight.maxAttempts})` : "";
    if (outcome !== "stored") {
      log.info(
        { ...ids, outcome },
        `result for ${step} from ${poolId ?? "a departed pool"} was ${outcome}: acknowledged and ignored`,
      );
    } else if (result.status === "complete") {
      log.info(ids, `completed ${step}${ms}${of}`);
    } else {
      const e = result.error;
      log.warn(
        { ...ids, error_type: e?.type, retryable: e?.retryable },
        `failed ${step}${ms}${of}: ${e?.type ?? "error"}: ${e?.message ?? ""}`,
      );
    }
  }
}

/** `pool` serves every handler `other` serves. */
function servesAll(pool: PoolRecord, other: PoolRecord): boolean {
  if (pool === other) return true;
  for (const h of other.handlers) if (!pool.handlers.has(h)) return false;
  return true;
}
