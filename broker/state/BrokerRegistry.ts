/**
 * Brokers sharing one database: each has a `brokers` row (migration 0011)
 * that it registers at start, heartbeats while it runs and marks stopped on a
 * clean stop, and every live broker takes back the in-flight attempts of the
 * brokers that died.
 *
 * The bound: a broker is dead when its row's heartbeat is older than
 * `deadAfterMs` (default BROKER_DEAD_AFTER_MS, 10 s, five missed heartbeats
 * at BROKER_HEARTBEAT_INTERVAL_MS, 2 s). A stopped row is reclaimable at once.
 * With the broker's maintenance calling reclaimDeadBrokers every
 * BROKER_RECLAIM_INTERVAL_MS, a dead broker's in-flight steps are ready again
 * at most deadAfterMs + BROKER_RECLAIM_INTERVAL_MS (12 s) after its last
 * heartbeat.
 *
 * What the broker's maintenance must call (times are the defaults):
 *  - registerBroker at start, before it claims anything;
 *  - heartbeatBroker every 2 s; when it returns false, registerBroker again
 *    (the row was deleted, or marked stopped while this process still runs);
 *  - reclaimDeadBrokers every 2 s (any live broker may: several at once each
 *    take a given attempt at most once), and log each from-broker's count;
 *  - expireLeases({ self }) without brokerId, every lease check: every
 *    broker's expired leases, not only its own;
 *  - markBrokerStopped after its drain, at a clean stop, once its heartbeat
 *    timer is stopped (a heartbeat after it returns false, and registering
 *    again would mark the stopping broker alive).
 * Pass `self` (its own id) to reclaimDeadBrokers and expireLeases, and use
 * StateManager.listen({ onWork, onEvent }) for one LISTEN connection: on a
 * cancel event, CANCEL the attempts whose brokerId is its own and that it
 * still holds; on a finished event, answer the WAITs held for that task.
 */
import { hostname } from "node:os";
import { AttemptEndings, TransitionEvents } from "./transitions";
import { CancelReasons } from "../../protocol/constants";
import type { EventNotifier } from "./EventNotifier";
import type { Requeues } from "./Requeues";
import type { StateSql } from "./StateSql";
import { iso } from "./rows";
import type {
  BrokerRecord,
  BrokerRegistration,
  EventAttempt,
  ReclaimedAttempt,
  RequeueResult,
} from "./types";

/** How often a broker heartbeats its brokers row. */
export const BROKER_HEARTBEAT_INTERVAL_MS = 2000;
/** A broker whose row has not heartbeaten for this long is dead: its in-flight attempts are reclaimed. */
export const BROKER_DEAD_AFTER_MS = 10_000;
/** How often a live broker looks for dead brokers' attempts. */
export const BROKER_RECLAIM_INTERVAL_MS = 2000;

/** Most attempts one reclaimDeadBrokers call takes back; the rest wait for the next call. */
const RECLAIM_BATCH = 10_000;

interface BrokerRow {
  broker_id: string;
  endpoints: string[];
  version: string;
  pid: number | null;
  host: string;
  started_at: Date;
  last_heartbeat_at: Date;
  stopped_at: Date | null;
  heartbeat_age_ms: number;
  alive: boolean;
  in_flight: number;
}

/** Per broker reclaimed from: how many attempts, and a log line naming it. */
export interface ReclaimSummary {
  fromBrokerId: string;
  attempts: number;
  fromHeartbeatAgeMs: number | null;
  message: string;
}

/** Groups reclaimed attempts by the broker they came from, with the log line for each. */
export function summarizeReclaims(reclaimed: ReclaimedAttempt[]): ReclaimSummary[] {
  const byBroker = new Map<string, ReclaimSummary>();
  for (const r of reclaimed) {
    const s = byBroker.get(r.fromBrokerId) ?? {
      fromBrokerId: r.fromBrokerId,
      attempts: 0,
      fromHeartbeatAgeMs: r.fromHeartbeatAgeMs,
      message: "",
    };
    s.attempts += 1;
    byBroker.set(r.fromBrokerId, s);
  }
  for (const s of byBroker.values()) {
    const since =
      s.fromHeartbeatAgeMs === null
        ? "it has no brokers row"
        : `last heartbeat ${Math.round(s.fromHeartbeatAgeMs / 1000)} s ago`;
    s.message = `recovered ${s.attempts} attempts from broker ${s.fromBrokerId} (${since})`;
  }
  return [...byBroker.values()];
}

export class BrokerRegistry {
  constructor(
    private readonly sql: StateSql,
    private readonly requeues: Requeues,
    private readonly events: EventNotifier,
  ) {}

  /**
   * Upserts this broker's row: started and heartbeat now, not stopped. A
   * restart under the same id takes the row over (started_at is reset).
   * Returns the start time, by the database's clock.
   */
  async registerBroker(registration: BrokerRegistration): Promise<{ startedAt: string }> {
    const [row] = await this.sql.run<{ started_at: Date }>("register_broker", [
      registration.brokerId,
      registration.endpoints,
      registration.version,
      Number.isInteger(registration.pid) ? registration.pid : null,
      registration.host === "" ? hostname() : registration.host,
    ]);
    if (row === undefined) throw new Error("register_broker returned no row");
    this.sql.logger.info(
      { brokerId: registration.brokerId, endpoints: registration.endpoints },
      "registered broker",
    );
    return { startedAt: iso(row.started_at) };
  }

  /**
   * One cheap UPDATE of the row's heartbeat. False when there is no live row
   * any more (deleted, or marked stopped): the caller registers again.
   */
  async heartbeatBroker(brokerId: string): Promise<boolean> {
    return (await this.sql.run("heartbeat_broker", [brokerId])).length > 0;
  }

  /**
   * A clean stop, after the broker's drain: its row says stopped (heartbeat
   * now), so the attempts it still leases are reclaimed by the next live
   * broker at once instead of after the bound. False when it had no row.
   */
  async markBrokerStopped(brokerId: string): Promise<boolean> {
    return (await this.sql.run("stop_broker", [brokerId])).length > 0;
  }

  /** Every broker row, oldest start first; alive means not stopped and a heartbeat within `deadAfterMs`. */
  async listBrokers(options: { deadAfterMs?: number } = {}): Promise<BrokerRecord[]> {
    const deadAfterMs = options.deadAfterMs ?? BROKER_DEAD_AFTER_MS;
    const rows = await this.sql.run<BrokerRow>("list_brokers", [Math.floor(deadAfterMs)]);
    return rows.map((r) => ({
      brokerId: r.broker_id,
      endpoints: r.endpoints,
      version: r.version,
      pid: r.pid ?? 0,
      host: r.host,
      startedAt: iso(r.started_at),
      lastHeartbeatAt: iso(r.last_heartbeat_at),
      stoppedAt: r.stopped_at === null ? null : iso(r.stopped_at),
      heartbeatAgeMs: r.heartbeat_age_ms,
      alive: r.alive,
      status: r.stopped_at !== null ? "stopped" : r.alive ? "alive" : "dead",
      inFlight: r.in_flight,
    }));
  }

  /**
   * Takes back the in-flight attempts leased by brokers other than `self`
   * that are dead (heartbeat older than deadAfterMs) or stopped, when the
   * attempt started before that broker's last heartbeat (one started after it
   * proves the broker lived on: its lease decides), and those leased by
   * brokers with no row at all (older brokers, a previous life under another
   * id) whose lease expired more than deadAfterMs ago. Each ends as `lost`, is
   * counted, and its step is ready again (or error with no attempt left),
   * with its history, like recoverOrphans.
   *
   * Exactly once among any number of concurrent callers: the tasks are locked
   * in id order with SKIP LOCKED (a task another caller holds is left to it),
   * then each step is locked and re-checked still leased by the same broker
   * (an attempt a pool adopted meanwhile at a live broker is kept). The
   * from-brokers are told by a cancel event (reason lease_lost), in case one
   * was only stalled. Returns each attempt taken, with the broker it came
   * from; summarizeReclaims() gives the log line per broker.
   */
  async reclaimDeadBrokers(options: {
    self: string;
    deadAfterMs?: number;
    limit?: number;
  }): Promise<ReclaimedAttempt[]> {
    const deadAfterMs = Math.floor(options.deadAfterMs ?? BROKER_DEAD_AFTER_MS);
    const result = await this.sql.transaction("reclaimDeadBrokers", async (client) => {
      const candidates = await this.sql.runIn<{
        attempt_id: string;
        task_id: string;
        broker_id: string;
        heartbeat_age_ms: number | null;
      }>(client, "lock_dead_leases", [options.self, deadAfterMs, options.limit ?? RECLAIM_BATCH]);
      if (candidates.length === 0) return { reclaimed: [], finished: [], announced: [] };
      const still = new Set(
        (
          await this.sql.runIn<{ attempt_id: string }>(client, "lock_leases_of", [
            candidates.map((c) => c.attempt_id),
            candidates.map((c) => c.broker_id),
          ])
        ).map((r) => r.attempt_id),
      );
      const byBroker = new Map<string, typeof candidates>();
      for (const c of candidates) {
        if (!still.has(c.attempt_id)) continue;
        const list = byBroker.get(c.broker_id) ?? [];
        list.push(c);
        byBroker.set(c.broker_id, list);
      }
      const reclaimed: ReclaimedAttempt[] = [];
      const finished: RequeueResult["finishedTasks"] = [];
      for (const [brokerId, list] of byBroker) {
        const age = list[0]?.heartbeat_age_ms ?? null;
        const taken = await this.requeues.requeueLocked(
          client,
          list.map((c) => c.attempt_id),
          {
            ending: AttemptEndings.LOST,
            countAttempt: true,
            backoff: false,
            onlyExpired: false,
            reason:
              age === null
                ? `reclaimed by broker ${options.self}: broker ${brokerId} has no brokers row and the lease expired`
                : `reclaimed by broker ${options.self}: broker ${brokerId} stopped or has not heartbeaten for ${Math.round(age / 1000)} s`,
            event: TransitionEvents.RECOVERED,
          },
        );
        for (const a of taken.attempts) {
          reclaimed.push({
            attemptId: a.attemptId,
            taskId: a.taskId,
            stepId: a.stepId,
            fromBrokerId: brokerId,
            fromHeartbeatAgeMs: age,
            state: a.state,
          });
        }
        finished.push(...taken.finishedTasks);
      }
      const announced: EventAttempt[] = reclaimed.map((r) => ({
        attemptId: r.attemptId,
        taskId: r.taskId,
        brokerId: r.fromBrokerId,
      }));
      await this.events.send(client, this.events.cancelPayloads(CancelReasons.LEASE_LOST, announced));
      return { reclaimed, finished, announced };
    });
    if (result.announced.length > 0) {
      this.events.wakeLocal([
        { kind: "cancel", reason: CancelReasons.LEASE_LOST, attempts: result.announced },
      ]);
    }
    this.events.wakeFinished(result.finished);
    for (const t of result.finished) {
      this.sql.logger.info(
        { task_id: t.taskId, state: t.state, error: t.error },
        "task finished after reclaiming a dead broker's attempts",
      );
    }
    return result.reclaimed;
  }
}
