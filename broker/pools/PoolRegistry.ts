/**
 * The pools connected to this broker: soft state, rebuilt from HELLOs. The
 * only durable truth is PostgreSQL; a broker restart loses nothing here that
 * it needs (pools re-HELLO and list the attempts they still hold).
 *
 * The registry is the only writer of a pool record. Everyone else holds the
 * read-only `PoolRecord` and changes a pool through a named method here, so
 * every change to credit (in flight, reserved, window) is in this one file,
 * and credit set aside is a `Reservation` given back by exactly one `settle()`.
 */
import type { Encoding, HelloBody, PoolView, Sdk } from "../../protocol";
import type { AdoptedAttempt } from "../state/types";
import { LostProbes } from "./LostProbes";

/**
 * What the broker remembers of one attempt it sent to a pool: the attempt as
 * adoption also describes it (an adopted attempt becomes one of these), plus
 * what only a send knows.
 */
export interface InFlight extends AdoptedAttempt {
  /** Steps that depend on this one (0 when not known, as for an adopted attempt). */
  children: number;
  sentAt: number;
  /** The task's submitted traceparent (null: none; undefined: not known, as for an adopted attempt), for its span. */
  traceparent?: string | null;
}

/**
 * Slow start (PROTOCOL.md, Credit). A pool that has not yet had a result
 * stored is unproven: while no pool is proven (a cold start) it may hold
 * INITIAL_WINDOW attempts, and all unproven pools together
 * UNPROVEN_CREDIT_BUDGET; once some pool is proven, an unproven one gets one
 * attempt (its probe) and all of them together PROBE_BUDGET, so pools that
 * never answer (a black hole, or a swarm of them) can park only that much of
 * the queue, and only until they are purged. A proven pool's window starts at
 * INITIAL_WINDOW and grows by INITIAL_WINDOW per stored result, up to its
 * capacity: 16, then 272 after a first round of 16 results, then 4,368.
 */
export const INITIAL_WINDOW = 16;
export const UNPROVEN_CREDIT_BUDGET = 1024;
export const PROBE_BUDGET = 16;
/**
 * Zombie pools (PROTOCOL.md): a pool whose last QUARANTINE_AFTER attempts
 * timed out in a row, with no result stored since, gets no new work until it
 * has a result stored or reconnects.
 */
export const QUARANTINE_AFTER = 3;
/** Steps remembered per pool as timed out there, so their retries go elsewhere when they can. */
const REMEMBERED_TIMEOUTS = 1024;
/** Earned windows kept for pools that left, for a reconnect with the same session. */
const REMEMBERED_WINDOWS = 10_000;

/** A pool as the registry keeps it; outside this file it is seen only as a read-only `PoolRecord`. */
interface MutablePool {
  /** The ROUTER routing id, as received. */
  readonly identity: Buffer;
  /** identity as a map key. */
  readonly key: string;
  readonly poolId: string;
  readonly handlers: ReadonlySet<string>;
  readonly capacity: number;
  readonly encoding: Encoding;
  readonly sdk: Sdk;
  readonly connectedAt: Date;
  readonly inFlight: Map<string, InFlight>;
  /** sha256 hex of the HELLO's session secret; undefined for a pool that sent none. */
  readonly sessionHash: string | undefined;
  /** HELLO `trace_context`: its STEP items get `trace` (an older pool's schema would refuse the field). */
  readonly traceContext: boolean;
  /** The most attempts it may hold now (slow start): grows by INITIAL_WINDOW per stored result, up to capacity. */
  window: number;
  /** Results of this pool (this session) stored; 0 marks a pool that has proved nothing yet. */
  stored: number;
  /** Attempts put in flight at this registration. */
  sent: number;
  /** Results received from this pool and not yet acknowledged. */
  unacked: number;
  /** Credit set aside for a claim under way (a dispatch claim, or children claimed with a commit). */
  reserved: number;
  /** Its last claim found less ready work than its credit (see Dispatcher.kick). */
  readyDrained: boolean;
  lastSeen: number;
  lastSent: number;
  /** The pool sent DISCONNECT: no new work; it leaves once its in-flight attempts are done. */
  draining: boolean;
  /**
   * Cancelled attempts whose handlers still hold a slot of the pool: as the
   * pool's last HEARTBEAT `cancelling` listed them, plus attempts timed out
   * since (until a HEARTBEAT or their late RESULT says otherwise). Counted
   * against credit. Only for pools that report `cancelling`.
   */
  lingering: Set<string>;
  /** The pool has sent HEARTBEAT `cancelling`: it says when a cancelled handler returns. */
  reportsCancelling: boolean;
  /** Attempts in a row that timed out here, with no result stored since. */
  timeoutsInARow: number;
  quarantined: boolean;
  /** Steps whose attempt timed out here (step id -> handler), most recent last: their retries go elsewhere. */
  timedOutSteps: Map<string, string>;
}

/** A pool as the broker's services see it: changed only through the registry's methods. */
export type PoolRecord = Readonly<Omit<MutablePool, "inFlight" | "lingering" | "timedOutSteps">> & {
  readonly inFlight: ReadonlyMap<string, InFlight>;
  readonly lingering: ReadonlySet<string>;
  readonly timedOutSteps: ReadonlyMap<string, string>;
};

/**
 * Credit set aside for a claim under way (a dispatch claim, children claimed
 * with a commit, or results parked while the committer is full). `settle()`
 * gives it back; only its first call does anything, so a path that may settle
 * twice (a failure after a success, a retry) cannot return credit twice.
 */
export interface Reservation {
  readonly pool: PoolRecord;
  readonly credit: number;
  /** Gives the credit back; true the first time, false after. */
  settle(): boolean;
  readonly settled: boolean;
}

export function identityKey(identity: Buffer): string {
  return identity.toString("latin1");
}

export class PoolRegistry {
  private readonly pools = new Map<string, MutablePool>();
  /** attempt id -> pool key, to find the holder of an attempt in O(1). */
  private readonly attempts = new Map<string, string>();
  /** In flight plus reserved, over the pools that have had nothing stored yet (bounded by UNPROVEN_CREDIT_BUDGET). */
  private unprovenHeld = 0;
  /** Registered pools that have had results stored. */
  private proven = 0;
  /** Steps last lost at an unproven pool: written here, when such a pool is forgotten. */
  readonly lostProbes = new LostProbes();
  /** pool id -> what its last session earned, so that a reconnect with that session keeps it. */
  private readonly earned = new Map<string, { sessionHash: string; window: number; stored: number }>();

  get size(): number {
    return this.pools.size;
  }

  get(key: string): PoolRecord | undefined {
    return this.pools.get(key);
  }

  all(): IterableIterator<PoolRecord> {
    return this.pools.values();
  }

  /** The pool is registered under its key and is this very record (not one it replaced). */
  isCurrent(pool: PoolRecord): boolean {
    return this.pools.get(pool.key) === pool;
  }

  register(
    identity: Buffer,
    hello: HelloBody,
    encoding: Encoding,
    now: number,
    sessionHash?: string,
  ): PoolRecord {
    const key = identityKey(identity);
    const kept = sessionHash === undefined ? undefined : this.earned.get(hello.pool_id);
    const earned = kept?.sessionHash === sessionHash ? kept : undefined;
    this.earned.delete(hello.pool_id);
    const record: MutablePool = {
      identity,
      key,
      poolId: hello.pool_id,
      handlers: new Set(hello.handlers),
      capacity: hello.capacity,
      encoding,
      sdk: hello.sdk,
      connectedAt: new Date(now),
      inFlight: new Map(),
      sessionHash,
      traceContext: hello.trace_context === true,
      window: Math.min(hello.capacity, Math.max(INITIAL_WINDOW, earned?.window ?? 0)),
      stored: earned?.stored ?? 0,
      sent: 0,
      unacked: 0,
      reserved: 0,
      readyDrained: false,
      lastSeen: now,
      lastSent: now,
      draining: false,
      lingering: new Set(),
      reportsCancelling: false,
      timeoutsInARow: 0,
      quarantined: false,
      timedOutSteps: new Map(),
    };
    this.pools.set(key, record);
    if (record.stored > 0) this.proven++;
    return record;
  }

  /** Forgets a pool and returns what it had in flight. */
  remove(key: string): InFlight[] {
    const pool = this.pools.get(key);
    if (!pool) return [];
    this.pools.delete(key);
    if (pool.stored === 0) {
      this.unprovenHeld -= pool.inFlight.size + pool.reserved;
      for (const f of pool.inFlight.values()) this.lostProbes.remember(f.stepId, f.handler);
    } else this.proven--;
    if (pool.sessionHash !== undefined && pool.stored > 0) {
      this.earned.delete(pool.poolId);
      this.earned.set(pool.poolId, {
        sessionHash: pool.sessionHash,
        window: pool.window,
        stored: pool.stored,
      });
      if (this.earned.size > REMEMBERED_WINDOWS) this.earned.delete(this.earned.keys().next().value!);
    }
    const held = [...pool.inFlight.values()];
    for (const f of held) this.attempts.delete(f.attemptId);
    return held;
  }

  addInFlight(record: PoolRecord, f: InFlight): void {
    const pool = writable(record);
    if (!pool.inFlight.has(f.attemptId)) {
      pool.sent++;
      if (this.counts(pool)) this.unprovenHeld++;
    }
    pool.inFlight.set(f.attemptId, f);
    this.attempts.set(f.attemptId, pool.key);
  }

  /** Sets `n` of the pool's credit aside until the reservation is settled. */
  reserve(record: PoolRecord, n: number): Reservation {
    const pool = writable(record);
    pool.reserved += n;
    if (this.counts(pool)) this.unprovenHeld += n;
    let settled = false;
    return {
      pool,
      credit: n,
      get settled() {
        return settled;
      },
      settle: () => {
        if (settled) return false;
        settled = true;
        pool.reserved -= n;
        if (this.counts(pool)) this.unprovenHeld -= n;
        return true;
      },
    };
  }

  /** A message arrived from the pool: it is alive. */
  touch(pool: PoolRecord, now: number): void {
    writable(pool).lastSeen = now;
  }

  /** A message went to the pool: no heartbeat is due until heartbeatMs after this. */
  noteSent(pool: PoolRecord, now: number): void {
    writable(pool).lastSent = now;
  }

  /** A result of the pool's went to the committer; it waits for its ACK. */
  noteResultReceived(pool: PoolRecord): void {
    writable(pool).unacked++;
  }

  /** A result of the pool's was acknowledged (stored, or refused for good). */
  noteResultAcked(pool: PoolRecord): void {
    const p = writable(pool);
    p.unacked = Math.max(0, p.unacked - 1);
  }

  /** What the pool's last claim found: less ready work than its credit, or not. */
  noteClaimed(pool: PoolRecord, drained: boolean): void {
    writable(pool).readyDrained = drained;
  }

  /** New work may be ready for anyone: every pool's next claim is worth making. */
  forgetDrained(): void {
    for (const p of this.pools.values()) p.readyDrained = false;
  }

  /** The pool sent DISCONNECT: no new work from now on. */
  drain(pool: PoolRecord): void {
    writable(pool).draining = true;
  }

  /**
   * A result of this pool was stored: its window grows by INITIAL_WINDOW, so a
   * pool that answers reaches its capacity within two or three rounds of
   * results (TCP's +1 per ACK would take log2(capacity / 16) rounds, each a
   * claim and a commit: measurable on a short run).
   */
  noteStored(record: PoolRecord): void {
    const pool = writable(record);
    if (this.counts(pool)) {
      this.unprovenHeld -= pool.inFlight.size + pool.reserved;
      this.proven++;
    }
    pool.stored++;
    pool.window = Math.min(pool.capacity, pool.window + INITIAL_WINDOW);
    pool.timeoutsInARow = 0;
    pool.quarantined = false;
  }

  /**
   * An attempt of the pool timed out and was cancelled. A pool that reports
   * `cancelling` keeps the slot counted until it says the handler returned;
   * the step's retry avoids this pool while another can take it. Returns true
   * when this timeout quarantined the pool.
   */
  noteTimedOut(record: PoolRecord, flight: InFlight): boolean {
    const pool = writable(record);
    if (pool.reportsCancelling && pool.lingering.size < pool.capacity) pool.lingering.add(flight.attemptId);
    pool.timedOutSteps.delete(flight.stepId);
    pool.timedOutSteps.set(flight.stepId, flight.handler);
    if (pool.timedOutSteps.size > REMEMBERED_TIMEOUTS)
      pool.timedOutSteps.delete(pool.timedOutSteps.keys().next().value!);
    pool.timeoutsInARow++;
    if (pool.quarantined || pool.timeoutsInARow < QUARANTINE_AFTER) return false;
    pool.quarantined = true;
    return true;
  }

  /**
   * The pool's HEARTBEAT listed the cancelled attempts whose handlers still
   * run: exactly those (at most its capacity) hold slots now.
   */
  noteCancelling(record: PoolRecord, attemptIds: readonly string[]): void {
    const pool = writable(record);
    pool.reportsCancelling = true;
    pool.lingering = new Set(attemptIds.slice(0, pool.capacity));
  }

  /** A result came for a cancelled attempt: its handler returned, and its slot is free. */
  noteLateResult(record: PoolRecord, attemptId: string): void {
    writable(record).lingering.delete(attemptId);
  }

  /** The attempt is in flight at this very pool (what a pool may report, extend or hand back). */
  holds(pool: PoolRecord, attemptId: string): boolean {
    return this.attempts.get(attemptId) === pool.key && this.pools.get(pool.key) === pool;
  }

  /** A registered pool that has had nothing stored: what it holds counts against the budget. */
  private counts(pool: PoolRecord): boolean {
    return pool.stored === 0 && this.pools.get(pool.key) === pool;
  }

  /** Ends an attempt's time in flight (result, cancel, release); returns it and its pool. */
  takeInFlight(attemptId: string): { pool: PoolRecord; flight: InFlight } | undefined {
    const key = this.attempts.get(attemptId);
    if (key === undefined) return undefined;
    this.attempts.delete(attemptId);
    const pool = this.pools.get(key);
    const flight = pool?.inFlight.get(attemptId);
    if (!pool || !flight) return undefined;
    if (this.counts(pool)) this.unprovenHeld--;
    else if (pool.stored > 0) this.lostProbes.forget(flight.stepId); // a proven pool ran it
    pool.inFlight.delete(attemptId);
    return { pool, flight };
  }

  holderOf(attemptId: string): PoolRecord | undefined {
    const key = this.attempts.get(attemptId);
    return key === undefined ? undefined : this.pools.get(key);
  }

  credit(pool: PoolRecord): number {
    if (pool.draining || pool.quarantined) return 0;
    const held = pool.inFlight.size + pool.reserved + pool.lingering.size;
    const free = Math.max(0, pool.window - held);
    if (pool.stored > 0) return free;
    // Beside a proven pool, work parked at a pool that may never answer waits for its purge
    // (or lease) while the proven pool could run it: an unproven pool gets one attempt to prove itself.
    const [window, budget] = this.proven > 0 ? [1, PROBE_BUDGET] : [pool.window, UNPROVEN_CREDIT_BUDGET];
    return Math.max(0, Math.min(window - held, budget - this.unprovenHeld));
  }

  /**
   * Pools that can take work now: those that have had results stored first,
   * least loaded first; then the unproven ones, those sent the fewest attempts
   * first (a newcomer is tried before pools that took work and never
   * answered), the most recently connected first among equals (one connected
   * long without completing anything is the likelier black hole, and a silent
   * one is nearest its purge, which would count the probe as a lost attempt).
   */
  withCredit(): PoolRecord[] {
    return [...this.pools.values()]
      .filter((p) => this.credit(p) > 0)
      .sort(
        (a, b) =>
          Number(b.stored > 0) - Number(a.stored > 0) ||
          (a.stored === 0 ? a.sent - b.sent || b.connectedAt.getTime() - a.connectedAt.getTime() : 0) ||
          (a.inFlight.size + a.reserved) / a.capacity - (b.inFlight.size + b.reserved) / b.capacity,
      );
  }

  /** Attempts in flight at all pools. */
  inFlightTotal(): number {
    return this.attempts.size;
  }

  servedHandlers(): Set<string> {
    const out = new Set<string>();
    for (const p of this.pools.values()) if (!p.draining) for (const h of p.handlers) out.add(h);
    return out;
  }

  /** Every pool with its id: what admins see (the wire type leaves pool_id out for other clients). */
  view(now: number): (PoolView & { pool_id: string })[] {
    return [...this.pools.values()].map((p) => ({
      pool_id: p.poolId,
      sdk: p.sdk,
      handlers: [...p.handlers],
      capacity: p.capacity,
      in_flight: p.inFlight.size,
      unacked_results: p.unacked,
      encoding: p.encoding,
      connected_at: p.connectedAt.toISOString(),
      last_seen_ms_ago: Math.max(0, now - p.lastSeen),
      cancelling: p.lingering.size,
      credit: this.credit(p),
      draining: p.draining,
      quarantined: p.quarantined,
    }));
  }
}

/**
 * The one place a read-only record becomes writable again: every record was
 * made by `register` as a MutablePool, and only this file calls this.
 */
function writable(pool: PoolRecord): MutablePool {
  return pool as MutablePool;
}
