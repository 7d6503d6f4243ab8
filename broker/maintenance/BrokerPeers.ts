/**
 * The other brokers on this database. This broker keeps its `brokers` row
 * alive (registered at start, heartbeaten, marked stopped at a clean stop),
 * takes back, exactly once, the in-flight attempts of brokers whose
 * heartbeat is older than BROKER_DEAD_AFTER_MS (or that stopped, or have no
 * row), and acts on the events other brokers announce: a CANCEL for an
 * attempt of a task cancelled elsewhere, and the answer to a WAIT for a task
 * finished elsewhere.
 */
import { readFileSync } from "node:fs";
import { hostname } from "node:os";
import { coerceError } from "../../protocol";
import type { BrokerContext } from "../BrokerContext";
import type { PoolRecord } from "../pools/PoolRegistry";
import {
  BROKER_DEAD_AFTER_MS,
  BROKER_HEARTBEAT_INTERVAL_MS,
  BROKER_RECLAIM_INTERVAL_MS,
  summarizeReclaims,
} from "../state/BrokerRegistry";
import type { BrokerEvent } from "../state/types";

const VERSION = (
  JSON.parse(readFileSync(new URL("../../package.json", import.meta.url), "utf8")) as { version: string }
).version;

export interface PeerHooks {
  /** A task finished, here or under another broker: answer its waiters. */
  finished(taskId: string): void;
  /** Notifications may have been missed (the LISTEN connection was lost): check every waiter. */
  missed(): void;
}

export class BrokerPeers {
  private readonly timers: NodeJS.Timeout[] = [];

  constructor(
    private readonly ctx: BrokerContext,
    private readonly hooks: PeerHooks,
  ) {}

  /** Registers this broker's row (before it claims anything) and starts its heartbeat and the reclaim look. */
  async start(endpoints: string[]): Promise<void> {
    await this.register(endpoints);
    this.timers.push(
      setInterval(() => void this.heartbeat(endpoints), BROKER_HEARTBEAT_INTERVAL_MS),
      setInterval(() => void this.reclaim(), BROKER_RECLAIM_INTERVAL_MS),
    );
  }

  /** Stops the heartbeat and the reclaim look (a heartbeat after markStopped would register again). */
  stop(): void {
    for (const t of this.timers) clearInterval(t);
    this.timers.length = 0;
  }

  /** After a clean stop's drain: others take whatever is left at once, not after the dead-broker bound. */
  async markStopped(): Promise<void> {
    await this.ctx.state.markBrokerStopped(this.ctx.id).catch((e: unknown) => {
      this.ctx.log.warn(
        { err: coerceError(e) },
        "could not mark this broker stopped; others will take its work once its heartbeat is old",
      );
    });
  }

  /** An event from any broker on the database (this one's included). */
  onEvent(event: BrokerEvent): void {
    const { ctx } = this;
    switch (event.kind) {
      case "cancel": {
        const byPool = new Map<PoolRecord, string[]>();
        for (const a of event.attempts) {
          if (a.brokerId !== ctx.id) continue;
          const held = ctx.pools.takeInFlight(a.attemptId);
          if (!held) continue;
          const list = byPool.get(held.pool) ?? [];
          list.push(a.attemptId);
          byPool.set(held.pool, list);
        }
        for (const [pool, ids] of byPool) {
          ctx.log.info(
            { pool_id: pool.poolId, attempts: ids.length, reason: event.reason },
            `cancelling ${ids.length} attempts at pool ${pool.poolId}: ${event.reason} by another broker`,
          );
          ctx.sendCancel(pool, ids, event.reason);
        }
        if (byPool.size > 0) ctx.kick();
        return;
      }
      case "finished":
        return this.hooks.finished(event.taskId);
      case "reconnected":
        return this.hooks.missed();
    }
  }

  private async register(endpoints: string[]): Promise<void> {
    await this.ctx.state.registerBroker({
      brokerId: this.ctx.id,
      endpoints,
      version: VERSION,
      pid: process.pid,
      host: hostname(),
    });
  }

  private async heartbeat(endpoints: string[]): Promise<void> {
    const { ctx } = this;
    try {
      if (!(await ctx.state.heartbeatBroker(ctx.id))) {
        ctx.log.warn(
          "this broker's row was gone (deleted by hand, or the database restored); registered again",
        );
        await this.register(endpoints);
      }
    } catch (e) {
      const err = coerceError(e);
      ctx.limiter.write(
        `broker-heartbeat:${err.message}`,
        `for "could not heartbeat this broker's row"`,
        "warn",
        { err },
        `could not heartbeat this broker's row: ${err.message}; after ${BROKER_DEAD_AFTER_MS / 1000} s without one, other brokers take its work`,
        { lines: 1 },
      );
    }
  }

  private async reclaim(): Promise<void> {
    const { ctx } = this;
    if (!ctx.isRunning()) return;
    try {
      const reclaimed = await ctx.state.reclaimDeadBrokers({
        self: ctx.id,
        deadAfterMs: BROKER_DEAD_AFTER_MS,
      });
      if (reclaimed.length === 0) return;
      for (const s of summarizeReclaims(reclaimed)) {
        ctx.log.warn(
          { from_broker_id: s.fromBrokerId, attempts: s.attempts, heartbeat_age_ms: s.fromHeartbeatAgeMs },
          s.message,
        );
      }
      ctx.kick();
    } catch (e) {
      const err = coerceError(e);
      ctx.limiter.write(
        `broker-reclaim:${err.message}`,
        `for "could not look for dead brokers' work"`,
        "error",
        { err },
        `could not look for dead brokers' work: ${err.message}; retrying in ${BROKER_RECLAIM_INTERVAL_MS} ms`,
        { lines: 1 },
      );
    }
  }
}
