/**
 * The pools connected to this broker: soft state, rebuilt from HELLOs. The
 * only durable truth is PostgreSQL; a broker restart loses nothing here that
 * it needs (pools re-HELLO and list the attempts they still hold).
 */
import type { Encoding, HelloBody, PoolView, Sdk } from "../protocol";
import type { AdoptedAttempt } from "./state/types";

/**
 * What the broker remembers of one attempt it sent to a pool: the attempt as
 * adoption also describes it (an adopted attempt becomes one of these), plus
 * what only a send knows.
 */
export interface InFlight extends AdoptedAttempt {
  /** Steps that depend on this one (0 when not known, as for an adopted attempt). */
  children: number;
  sentAt: number;
}

export interface PoolRecord {
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
  /** Results received from this pool and not yet acknowledged. */
  unacked: number;
  /** Credit set aside for a claim under way (a dispatch claim, or children claimed with a commit). */
  reserved: number;
  /** Its last claim found less ready work than its credit (see Broker.kickDispatch). */
  readyDrained: boolean;
  lastSeen: number;
  lastSent: number;
  /** The pool sent DISCONNECT: no new work; it leaves once its in-flight attempts are done. */
  draining: boolean;
}

export function identityKey(identity: Buffer): string {
  return identity.toString("latin1");
}

export class PoolRegistry {
  private readonly pools = new Map<string, PoolRecord>();
  /** attempt id -> pool key, to find the holder of an attempt in O(1). */
  private readonly attempts = new Map<string, string>();

  get size(): number {
    return this.pools.size;
  }

  get(key: string): PoolRecord | undefined {
    return this.pools.get(key);
  }

  all(): IterableIterator<PoolRecord> {
    return this.pools.values();
  }

  register(identity: Buffer, hello: HelloBody, encoding: Encoding, now: number): PoolRecord {
    const key = identityKey(identity);
    const record: PoolRecord = {
      identity,
      key,
      poolId: hello.pool_id,
      handlers: new Set(hello.handlers),
      capacity: hello.capacity,
      encoding,
      sdk: hello.sdk,
      connectedAt: new Date(now),
      inFlight: new Map(),
      unacked: 0,
      reserved: 0,
      readyDrained: false,
      lastSeen: now,
      lastSent: now,
      draining: false,
    };
    this.pools.set(key, record);
    return record;
  }

  /** Forgets a pool and returns what it had in flight. */
  remove(key: string): InFlight[] {
    const pool = this.pools.get(key);
    if (!pool) return [];
    this.pools.delete(key);
    const held = [...pool.inFlight.values()];
    for (const f of held) this.attempts.delete(f.attemptId);
    return held;
  }

  addInFlight(pool: PoolRecord, f: InFlight): void {
    pool.inFlight.set(f.attemptId, f);
    this.attempts.set(f.attemptId, pool.key);
  }

  /** Ends an attempt's time in flight (result, cancel, release); returns it and its pool. */
  takeInFlight(attemptId: string): { pool: PoolRecord; flight: InFlight } | undefined {
    const key = this.attempts.get(attemptId);
    if (key === undefined) return undefined;
    this.attempts.delete(attemptId);
    const pool = this.pools.get(key);
    const flight = pool?.inFlight.get(attemptId);
    if (!pool || !flight) return undefined;
    pool.inFlight.delete(attemptId);
    return { pool, flight };
  }

  holderOf(attemptId: string): PoolRecord | undefined {
    const key = this.attempts.get(attemptId);
    return key === undefined ? undefined : this.pools.get(key);
  }

  credit(pool: PoolRecord): number {
    return pool.draining ? 0 : Math.max(0, pool.capacity - pool.inFlight.size - pool.reserved);
  }

  /** Pools that can take work now, least loaded first. */
  withCredit(): PoolRecord[] {
    return [...this.pools.values()]
      .filter((p) => this.credit(p) > 0)
      .sort(
        (a, b) => (a.inFlight.size + a.reserved) / a.capacity - (b.inFlight.size + b.reserved) / b.capacity,
      );
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
    }));
  }
}
