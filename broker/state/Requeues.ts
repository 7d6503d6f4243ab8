/**
 * Taking attempts back from pools: the lease reaper (timeouts), releases
 * (a pool lost, a STEP undelivered) and recovery after a broker restart. Each
 * ends the attempt with its outcome and puts the step back by its retry policy.
 */
import type pg from "pg";
import { type CancelReason, CancelReasons } from "../../protocol/constants";
import { AttemptEndings, TransitionEvents } from "./transitions";
import type { EventNotifier } from "./EventNotifier";
import type { StateSql } from "./StateSql";
import { type RequeueRow, isUuid, iso } from "./rows";
import type { EventAttempt, ExpiredAttempt, FinishedTask, RequeueResult, RequeuedAttempt } from "./types";

/** Most attempts one expireLeases / recoverOrphans call takes back; the rest wait for the next call. */
const REQUEUE_BATCH = 10_000;

/** How one requeue (expiry, release, recovery, reclaim) treats the attempts it takes back. */
export interface RequeueMode {
  ending: typeof AttemptEndings.TIMEOUT | typeof AttemptEndings.LOST | typeof AttemptEndings.UNDELIVERED;
  countAttempt: boolean;
  backoff: boolean;
  onlyExpired: boolean;
  reason: string;
  event: string;
}

export class Requeues {
  constructor(
    private readonly sql: StateSql,
    private readonly events: EventNotifier,
  ) {}

  /**
   * Takes the attempts back by `mode` and finalizes their tasks, in the
   * caller's transaction, with their tasks already locked (in id order).
   */
  async requeueLocked(
    client: pg.PoolClient,
    attemptIds: string[],
    mode: RequeueMode,
  ): Promise<RequeueResult> {
    if (attemptIds.length === 0) return { attempts: [], finishedTasks: [] };
    const rows = await this.sql.runIn<RequeueRow>(client, "requeue_attempts", [
      attemptIds,
      mode.ending,
      mode.countAttempt,
      mode.backoff,
      mode.onlyExpired,
      mode.reason,
      mode.event,
    ]);
    const attempts: RequeuedAttempt[] = rows.map((r) => ({
      attemptId: r.attempt_id,
      stepId: r.step_id,
      taskId: r.task_id,
      handler: r.handler,
      state: r.state,
      runAt: iso(r.run_at),
      brokerId: r.broker_id,
      poolId: r.pool_id,
    }));
    const finishedTasks = await this.sql.finalize(
      client,
      rows.map((r) => r.task_id),
    );
    return { attempts, finishedTasks };
  }

  /**
   * The lease reaper: every in-flight attempt whose lease expired (of this
   * broker only, when brokerId is given; of any broker without it) ends as a
   * timeout, and its step follows its retry policy (ready after the backoff, or
   * error). Returns those attempts so the broker can send CANCEL for its own;
   * those of brokers other than `self` (default: brokerId) are announced to
   * them as cancel events (reason timeout), in the same transaction. Brokers
   * calling this at the same moment take each lease exactly once: the second
   * waits for the first's task locks, and requeue_attempts then finds the
   * lease gone.
   */
  async expireLeases(
    options: { brokerId?: string; limit?: number; self?: string } = {},
  ): Promise<ExpiredAttempt[]> {
    const self = options.self ?? options.brokerId;
    const result = await this.sql.transaction("expireLeases", async (client) => {
      const locked = await this.sql.runIn<{ attempt_id: string }>(client, "lock_expired", [
        options.brokerId ?? null,
        options.limit ?? REQUEUE_BATCH,
      ]);
      const taken = await this.requeueLocked(
        client,
        locked.map((r) => r.attempt_id),
        {
          ending: AttemptEndings.TIMEOUT,
          countAttempt: true,
          backoff: true,
          onlyExpired: true,
          reason: "lease expired",
          event: TransitionEvents.TIMED_OUT,
        },
      );
      return { ...taken, announced: await this.announce(client, taken, CancelReasons.TIMEOUT, self) };
    });
    this.afterCommit(result, CancelReasons.TIMEOUT);
    this.logFinished(result.finishedTasks, "lease expiry");
    return result.attempts;
  }

  /**
   * In the caller's transaction: tells the brokers (other than `self`) whose
   * attempts these were that they lost their lease, so they CANCEL them at
   * their pools. Returns what it announced, for the local listeners.
   */
  private async announce(
    client: pg.PoolClient,
    taken: RequeueResult,
    reason: CancelReason,
    self: string | undefined,
  ): Promise<EventAttempt[]> {
    const announced = taken.attempts
      .filter((a) => a.brokerId !== self)
      .map((a) => ({ attemptId: a.attemptId, taskId: a.taskId, brokerId: a.brokerId }));
    await this.events.send(client, this.events.cancelPayloads(reason, announced));
    return announced;
  }

  /** Once committed: this process's event listeners hear what the requeue announced and finished. */
  private afterCommit(result: RequeueResult & { announced?: EventAttempt[] }, reason: CancelReason): void {
    if (result.announced !== undefined && result.announced.length > 0) {
      this.events.wakeLocal([{ kind: "cancel", reason, attempts: result.announced }]);
    }
    this.events.wakeFinished(result.finishedTasks);
  }

  /**
   * Puts in-flight steps back to ready at once. countAttempt true: the attempt
   * may have run (its pool died): it counts, and with no attempt left (or
   * retries forbidden) the step fails. countAttempt false: it never reached a
   * handler: the attempt number is given back. Steps whose lease moved to
   * another attempt are not touched.
   */
  async releaseAttempts(
    attemptIds: string[],
    options: { countAttempt: boolean; reason: string },
  ): Promise<RequeueResult> {
    const ids = attemptIds.filter(isUuid).map((id) => id.toLowerCase());
    if (ids.length === 0) return { attempts: [], finishedTasks: [] };
    const result = await this.sql.transaction("releaseAttempts", async (client) => {
      await this.sql.runIn(client, "lock_tasks_of_attempts", [ids]);
      return await this.requeueLocked(client, ids, {
        ending: options.countAttempt ? AttemptEndings.LOST : AttemptEndings.UNDELIVERED,
        countAttempt: options.countAttempt,
        backoff: false,
        onlyExpired: false,
        reason: options.reason,
        event: TransitionEvents.RELEASED,
      });
    });
    this.events.wakeFinished(result.finishedTasks);
    return result;
  }

  /**
   * At broker start (after a grace period): in-flight steps leased by this
   * broker id before `olderThan` (a previous life of this broker; default: now)
   * or by anyone whose lease expired become ready again, counting the attempt.
   * Pass the broker's start time as olderThan so its own new leases are kept.
   */
  async recoverOrphans(options: {
    brokerId: string;
    olderThan?: Date;
    keep?: string[];
  }): Promise<RequeueResult> {
    const result = await this.sql.transaction("recoverOrphans", async (client) => {
      const locked = await this.sql.runIn<{ attempt_id: string }>(client, "lock_orphans", [
        options.brokerId,
        options.olderThan ?? null,
        REQUEUE_BATCH,
        (options.keep ?? []).filter(isUuid),
      ]);
      const taken = await this.requeueLocked(
        client,
        locked.map((r) => r.attempt_id),
        {
          ending: AttemptEndings.LOST,
          countAttempt: true,
          backoff: false,
          onlyExpired: false,
          reason: "recovered: its broker restarted or its lease expired",
          event: TransitionEvents.RECOVERED,
        },
      );
      return {
        ...taken,
        announced: await this.announce(client, taken, CancelReasons.LEASE_LOST, options.brokerId),
      };
    });
    this.afterCommit(result, CancelReasons.LEASE_LOST);
    if (result.attempts.length > 0) {
      this.sql.logger.info(
        { brokerId: options.brokerId, recovered: result.attempts.length },
        "recovered orphaned attempts",
      );
    }
    return { attempts: result.attempts, finishedTasks: result.finishedTasks };
  }

  private logFinished(tasks: FinishedTask[], why: string): void {
    for (const t of tasks)
      this.sql.logger.info(
        { taskId: t.taskId, state: t.state, error: t.error },
        `task finished after ${why}`,
      );
  }
}
