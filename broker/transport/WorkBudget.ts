/**
 * How much decoding one peer may cost the broker: a token bucket of bytes and
 * one of messages per peer, each refilled at its rate per second and holding
 * at most one second of it. A message over either bucket is not decoded: the
 * receive loop is shared by every peer, so one peer sending as fast as libzmq
 * delivers would otherwise take all of it (10,000 deeply nested bodies once
 * held the broker at 100% CPU for 96 s).
 *
 * A peer over budget for `sustainedSeconds` (messages dropped with no gap of a
 * second between two drops) is to be dropped; honest pools never come near the defaults (the benchmark's pool at
 * full speed sends a few hundred messages and well under a MiB per second).
 * Memory is bounded: a peer whose buckets have refilled is forgotten (a fresh
 * bucket is the same thing), and at most `maxPeers` are tracked.
 */

/** Bytes of frames per peer per second (64 MiB). */
export const PEER_BYTES_PER_SECOND = 64 * 1024 * 1024;
/** Messages per peer per second. */
export const PEER_MESSAGES_PER_SECOND = 20_000;
/** Seconds of sustained excess (drops with no gap of a second between them) before the peer is dropped. */
export const PEER_OVER_BUDGET_SECONDS = 3;
const MAX_PEERS = 100_000;

export interface WorkBudgetOptions {
  bytesPerSecond?: number;
  messagesPerSecond?: number;
  sustainedSeconds?: number;
  now?: () => number;
}

interface Bucket {
  bytes: number;
  messages: number;
  at: number;
  /** When the current run of drops began (no gap of a second without one), and the last drop. */
  overSince: number;
  lastDrop: number;
}

/** What `take` decided: decode it, drop it, or drop it and disconnect the peer. */
export type BudgetVerdict = "ok" | "over" | "sustained";

export class WorkBudget {
  readonly bytesPerSecond: number;
  readonly messagesPerSecond: number;
  readonly sustainedSeconds: number;
  private readonly now: () => number;
  private readonly buckets = new Map<string, Bucket>();

  constructor(opts: WorkBudgetOptions = {}) {
    this.bytesPerSecond = opts.bytesPerSecond ?? PEER_BYTES_PER_SECOND;
    this.messagesPerSecond = opts.messagesPerSecond ?? PEER_MESSAGES_PER_SECOND;
    this.sustainedSeconds = opts.sustainedSeconds ?? PEER_OVER_BUDGET_SECONDS;
    this.now = opts.now ?? Date.now;
  }

  get size(): number {
    return this.buckets.size;
  }

  /** Charges one message of `bytes` to `peer`. */
  take(peer: string, bytes: number): BudgetVerdict {
    const now = this.now();
    let b = this.buckets.get(peer);
    if (b === undefined) {
      // Full (the periodic sweep forgets idle peers): forget the oldest, which restarts with a full bucket.
      if (this.buckets.size >= MAX_PEERS) {
        const oldest = this.buckets.keys().next();
        if (!oldest.done) this.buckets.delete(oldest.value);
      }
      b = {
        bytes: this.bytesPerSecond,
        messages: this.messagesPerSecond,
        at: now,
        overSince: 0,
        lastDrop: 0,
      };
      this.buckets.set(peer, b);
    } else {
      const elapsed = Math.max(0, now - b.at) / 1000;
      b.bytes = Math.min(this.bytesPerSecond, b.bytes + elapsed * this.bytesPerSecond);
      b.messages = Math.min(this.messagesPerSecond, b.messages + elapsed * this.messagesPerSecond);
      b.at = now;
    }
    if (b.messages >= 1 && b.bytes >= bytes) {
      b.messages -= 1;
      b.bytes -= bytes;
      return "ok";
    }
    // A message larger than a whole second of bytes can never fit; libzmq's size limit is far below that.
    if (now - b.lastDrop > 1000) b.overSince = now;
    b.lastDrop = now;
    return now - b.overSince >= this.sustainedSeconds * 1000 ? "sustained" : "over";
  }

  /** Forgets a peer (it was dropped; it starts afresh when it comes back). */
  forget(peer: string): void {
    this.buckets.delete(peer);
  }

  /** Forgets peers idle long enough for their buckets to be full again. */
  sweep(now = this.now()): void {
    for (const [peer, b] of this.buckets) {
      // Idle a second: both buckets are full, the same as a fresh one; and no drop streak to keep.
      if (now - b.at >= 1000 && now - b.lastDrop > 1000) this.buckets.delete(peer);
    }
  }
}
