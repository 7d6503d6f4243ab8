/**
 * The broker's timers: heartbeats (and the purge of silent pools), lease
 * expiry (of every broker's leases), the safety-net poll for work no
 * notification announced, once after a start the recovery of attempts this
 * broker's previous life left in flight that no reconnecting pool reclaimed,
 * the history tables' partitions (created ahead, and pruned when retention
 * is on), and, through BrokerPeers, the life among other brokers on the
 * database.
 */
import { CancelReasons, coerceError } from "../../protocol";
import type { BrokerContext } from "../BrokerContext";
import type { InFlight, PoolRecord } from "../pools/PoolRegistry";
import type { BrokerEvent } from "../state/types";
import { BrokerPeers, type PeerHooks } from "./BrokerPeers";

export interface MaintenanceHooks extends Pick<PeerHooks, "finished"> {
  /** Heartbeats pools and purges silent ones (PoolSessions.heartbeatTick). */
  heartbeat(now: number): void;
  /** Forgets per-peer memory that is out of date (PeerGuard.sweep). */
  sweep(now: number): void;
  /**
   * The broker itself did not run for `lagMs` (a blocked event loop, a
   * stopped or starved process): pools it did not hear from meanwhile are
   * not dead for that, so their liveness clocks start again from `now`.
   */
  stalled(now: number, lagMs: number): void;
  /** An attempt in flight at this pool timed out (PoolSessions.timedOut: slot held, quarantine). */
  timedOut(pool: PoolRecord, flight: InFlight): void;
  /** The poll's other duty: answer waiters of tasks another process finished. */
  poll(): Promise<void>;
  /** Attempts reconnecting pools reclaimed since the start: not orphans. */
  adopted(): Iterable<string>;
}

export class Maintenance {
  private readonly timers: NodeJS.Timeout[] = [];
  private readonly peers: BrokerPeers;
  private recovered = false;
  /** A prune of a large backlog may outlast the interval: ticks do not overlap. */
  private historyBusy = false;
  private startedAt = new Date();
  private lastBeat = 0;
  /** How late the last heartbeat tick ran, in ms: the broker's own timer lag. */
  timerLagMs = 0;

  constructor(
    private readonly ctx: BrokerContext,
    private readonly hooks: MaintenanceHooks,
  ) {
    this.peers = new BrokerPeers(ctx, { finished: hooks.finished, missed: () => void hooks.poll() });
  }

  /** Registers this broker among the others on its database (before it claims anything), then starts the timers. */
  async start(startedAt: Date, endpoints: string[]): Promise<void> {
    const { opts } = this.ctx;
    // Before the first claim, so today's rows (and the next days') have their partition.
    await this.historyTick();
    await this.peers.start(endpoints);
    this.startedAt = startedAt;
    const beatMs = Math.max(10, Math.floor(opts.heartbeatMs / 2));
    this.lastBeat = Date.now();
    this.every(beatMs, () => this.beat(beatMs));
    this.every(opts.leaseCheckMs, () => this.expireLeases());
    this.every(opts.pollMs, () => this.poll());
    this.every(opts.partitionCheckMs, () => this.historyTick());
    this.timers.push(setTimeout(() => void this.recoverOrphans(), opts.recoveryGraceMs));
  }

  stop(): void {
    this.peers.stop();
    for (const t of this.timers) clearTimeout(t);
    this.timers.length = 0;
  }

  /** After a clean stop's drain (see BrokerPeers.markStopped). */
  markStopped(): Promise<void> {
    return this.peers.markStopped();
  }

  /** An event another broker (or this one) announced on the database. */
  onEvent(event: BrokerEvent): void {
    this.peers.onEvent(event);
  }

  /**
   * A tick later than one heartbeat interval means the broker was not
   * running: the pools' silence meanwhile is the broker's, and purging them
   * would re-run work that is fine. Checked before the heartbeat purge, which
   * on resume runs before the messages that waited in the sockets are read.
   */
  private beat(beatMs: number): void {
    const now = Date.now();
    this.timerLagMs = Math.max(0, now - this.lastBeat - beatMs);
    this.lastBeat = now;
    if (this.timerLagMs > this.ctx.opts.heartbeatMs) {
      this.ctx.log.warn(
        { lag_ms: this.timerLagMs },
        `the broker did not run for ${this.timerLagMs} ms (a blocked event loop, or the process was stopped or starved): ` +
          "pools' liveness clocks start again instead of declaring them dead; if this repeats, give the broker more CPU",
      );
      this.hooks.stalled(now, this.timerLagMs);
    }
    this.hooks.heartbeat(now);
    this.hooks.sweep(now);
  }

  private async expireLeases(): Promise<void> {
    const { ctx } = this;
    try {
      // Every broker's expired leases (the others' are announced to them as cancel events).
      const expired = await ctx.state.expireLeases({ self: ctx.id });
      if (expired.length === 0) return;
      const byPool = new Map<PoolRecord, string[]>();
      for (const x of expired) {
        const held = ctx.pools.takeInFlight(x.attemptId);
        const pool = held?.pool.poolId ?? x.poolId ?? "unknown";
        ctx.metrics.attemptFinished(x.handler, pool, "timeout");
        if (x.state === "ready") ctx.metrics.stepsRetried(x.handler, pool);
        ctx.log.warn(
          {
            attempt_id: x.attemptId,
            task_id: x.taskId,
            step_id: x.stepId,
            pool_id: held?.pool.poolId ?? x.poolId,
            next: x.state,
          },
          `step ${held?.flight.stepName ?? x.stepId} timed out (attempt ${held?.flight.attempt ?? "?"}); it is now ${x.state}`,
        );
        if (!held) continue;
        this.hooks.timedOut(held.pool, held.flight);
        const list = byPool.get(held.pool) ?? [];
        list.push(x.attemptId);
        byPool.set(held.pool, list);
      }
      for (const [pool, ids] of byPool) ctx.sendCancel(pool, ids, CancelReasons.TIMEOUT);
      ctx.kick();
    } catch (e) {
      ctx.metrics.dbError();
      const err = coerceError(e);
      ctx.limiter.write(
        `expire:${err.message}`,
        `for "expiring leases failed"`,
        "error",
        { err },
        `expiring leases failed: ${err.message}; retrying on the next tick`,
        { lines: 1 },
      );
    }
  }

  /**
   * Creates the history partitions of the next days and, with retention on,
   * prunes what is older. A failure (the database away, a lock that timed
   * out) costs nothing until the default partition is needed: logged once
   * per interval, tried again on the next tick.
   */
  private async historyTick(): Promise<void> {
    const { ctx } = this;
    const { historyDaysAhead, historyRetentionDays } = ctx.opts;
    if (this.historyBusy) return;
    this.historyBusy = true;
    try {
      const created = await ctx.state.ensureHistoryPartitions(historyDaysAhead);
      for (const p of created)
        ctx.log.info(
          { partition: p.partitionName, from: p.rangeFrom, to: p.rangeTo, moved_rows: p.movedRows },
          `created history partition ${p.partitionName}` +
            (p.movedRows > 0 ? `, moving ${p.movedRows} rows into it from the default partition` : ""),
        );
      if (historyRetentionDays === 0) return;
      const pruned = await ctx.state.pruneHistory(new Date(Date.now() - historyRetentionDays * 86_400_000));
      if (pruned.deletedTasks > 0 || pruned.dropped.length > 0)
        ctx.log.info(
          {
            deleted_tasks: pruned.deletedTasks,
            dropped: pruned.dropped.map((p) => p.partitionName),
            before: pruned.before,
          },
          `retention: deleted ${pruned.deletedTasks} tasks finished before ${pruned.before}, dropped ${pruned.dropped.length} history partitions`,
        );
      if (pruned.heldBack)
        ctx.limiter.write(
          "history:held",
          `for "history partitions held back"`,
          "warn",
          { task_id: pruned.heldBack.taskId, partitions: pruned.heldBack.partitions },
          `retention keeps ${pruned.heldBack.partitions} history partitions older than ${historyRetentionDays} days: ` +
            `task ${pruned.heldBack.taskId} (${pruned.heldBack.state}, created ${pruned.heldBack.createdAt}) is still present; ` +
            "they go once it finishes and ages out (cancel it if it is stuck)",
          { lines: 1 },
        );
    } catch (e) {
      ctx.metrics.dbError();
      const err = coerceError(e);
      const why = describeWithCauses(err);
      ctx.limiter.write(
        `history:${why}`,
        `for "history partition maintenance failed"`,
        "error",
        { err },
        `history partition maintenance failed: ${why}; retrying on the next check, ` +
          "rows meanwhile go to the default partitions (check the database, or run stepbroker history partitions)",
        { lines: 1 },
      );
    } finally {
      this.historyBusy = false;
    }
  }

  private async poll(): Promise<void> {
    this.ctx.kick(undefined, true);
    await this.hooks.poll();
  }

  /**
   * After a start, attempts leased by this broker's previous life that no pool
   * reclaimed within the grace period go back to ready.
   */
  private async recoverOrphans(): Promise<void> {
    const { ctx } = this;
    if (this.recovered || !ctx.isRunning()) return;
    this.recovered = true;
    try {
      const { attempts } = await ctx.state.recoverOrphans({
        brokerId: ctx.id,
        olderThan: this.startedAt,
        keep: [...this.hooks.adopted()],
      });
      if (attempts.length > 0) {
        ctx.log.info(
          { attempts: attempts.length },
          `recovered ${attempts.length} attempts left in flight by a previous run`,
        );
        ctx.kick();
      }
    } catch (e) {
      this.recovered = false;
      const err = coerceError(e);
      ctx.limiter.write(
        `orphans:${err.message}`,
        `for "recovering orphaned attempts failed"`,
        "error",
        { err },
        `recovering orphaned attempts failed: ${err.message}; retrying shortly`,
        { lines: 1 },
      );
      this.timers.push(setTimeout(() => void this.recoverOrphans(), ctx.opts.pollMs));
    }
  }

  private every(ms: number, fn: () => unknown): void {
    this.timers.push(setInterval(() => void fn(), ms));
  }
}

/** The message with its causes' and PostgreSQL's hint: the statement's own wrapper names only the statement. */
function describeWithCauses(err: Error): string {
  const parts: string[] = [];
  for (let e: unknown = err; e instanceof Error; e = e.cause) {
    parts.push(e.message);
    const hint = (e as { hint?: unknown }).hint;
    if (typeof hint === "string") parts.push(`hint: ${hint}`);
  }
  return parts.join(": ");
}
