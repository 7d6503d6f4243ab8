/**
 * One outbox for the broker's sockets. zeromq.js allows a single pending
 * send() per socket (a second throws EBUSY), so every message the broker
 * sends goes through this queue, drained by one loop. An identity names the
 * socket its peer is on (see PeerIdentities.ts): the outbox sends on that socket,
 * to the peer's own routing id.
 *
 * The ROUTER runs with `mandatory` and `sendTimeout: 0`, so a send either
 * succeeds at once or fails with a code:
 *   EHOSTUNREACH  the peer is gone: tell the owner, who puts its steps back;
 *   EAGAIN        the peer's queue is full (back-pressure): park that peer's
 *                 messages, in order, and retry them shortly, while other
 *                 peers are served; after BLOCKED_GIVE_UP_MS the peer counts
 *                 as unreachable.
 * Nothing is dropped silently.
 */
import type { Router } from "zeromq";
import type { PeerIdentities } from "./PeerIdentities";

export interface OutboxHooks {
  /** A message could not be delivered because its peer is gone or stuck. */
  onUnreachable(identity: Buffer, frames: Buffer[]): void;
  /** Any other send failure; the message is dropped after this. */
  onError(identity: Buffer, error: Error): void;
}

interface Pending {
  identity: Buffer;
  key: string;
  frames: Buffer[];
  /** When this message first met back-pressure. */
  parkedSince?: number;
}

interface Parked {
  since: number;
  items: Pending[];
}

const BACKPRESSURE_RETRY_MS = 5;
const BLOCKED_GIVE_UP_MS = 5000;

export class Outbox {
  private queue: Pending[] = [];
  private readonly parked = new Map<string, Parked>();
  private retryTimer: NodeJS.Timeout | undefined;
  private draining = false;
  private closed = false;
  private idleWaiters: (() => void)[] = [];

  constructor(
    private readonly sockets: readonly Router[],
    private readonly identities: PeerIdentities,
    private readonly hooks: OutboxHooks,
  ) {}

  get size(): number {
    let n = this.queue.length;
    for (const p of this.parked.values()) n += p.items.length;
    return n;
  }

  send(identity: Buffer, frames: Buffer[]): void {
    if (this.closed) return;
    this.queue.push({ identity, key: identity.toString("latin1"), frames });
    if (!this.draining) void this.drain();
  }

  /** Resolves when everything queued so far has been handed to libzmq (or given up on). */
  flushed(): Promise<void> {
    if (!this.draining && this.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  close(): void {
    this.closed = true;
    this.queue = [];
    this.parked.clear();
    clearTimeout(this.retryTimer);
    this.wakeIdle();
  }

  private wakeIdle(): void {
    if (this.draining || (this.size > 0 && !this.closed)) return;
    const waiters = this.idleWaiters;
    this.idleWaiters = [];
    for (const w of waiters) w();
  }

  private async drain(): Promise<void> {
    this.draining = true;
    try {
      while (this.queue.length > 0 && !this.closed) {
        const item = this.queue.shift()!;
        const parked = this.parked.get(item.key);
        if (parked) {
          parked.items.push(item); // keep this peer's messages in order behind the parked ones
          continue;
        }
        try {
          const index = this.identities.socketOf(item.identity);
          const socket = this.sockets[index];
          if (!socket) throw new Error(`no socket ${index} for this identity`);
          await socket.send([this.identities.routingIdOf(item.identity), ...item.frames]);
        } catch (e) {
          if (this.closed) break;
          const code = (e as { code?: string }).code;
          if (code === "EAGAIN") this.park(item);
          else if (code === "EHOSTUNREACH") this.hooks.onUnreachable(item.identity, item.frames);
          else this.hooks.onError(item.identity, e instanceof Error ? e : new Error(String(e)));
        }
      }
    } finally {
      this.draining = false;
      this.wakeIdle();
    }
  }

  private park(item: Pending): void {
    item.parkedSince ??= Date.now();
    this.parked.set(item.key, { since: item.parkedSince, items: [item] });
    this.retryTimer ??= setTimeout(() => this.retryParked(), BACKPRESSURE_RETRY_MS);
  }

  private retryParked(): void {
    this.retryTimer = undefined;
    const now = Date.now();
    const retry: Pending[] = [];
    for (const [key, p] of this.parked) {
      this.parked.delete(key);
      if (now - p.since > BLOCKED_GIVE_UP_MS) {
        for (const item of p.items) this.hooks.onUnreachable(item.identity, item.frames);
      } else {
        retry.push(...p.items);
      }
    }
    this.queue = [...retry, ...this.queue];
    if (!this.draining) void this.drain();
    else this.wakeIdle();
  }
}
