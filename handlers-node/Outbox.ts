/**
 * The one sender of a socket. zeromq.js allows a single pending send() per
 * socket (a second one throws EBUSY), so everything a socket sends goes
 * through this queue, drained by one async loop.
 *
 * The socket is made with `sendTimeout: 0`: a send that cannot be queued in
 * libzmq at once fails with EAGAIN, which is back-pressure (the peer is slow or
 * the high-water mark is reached), not failure: the message stays first in
 * line and is tried again after a short pause. Any other send error drops the
 * message and is reported; the session above decides whether to reconnect.
 */
import type { Dealer } from "zeromq";
import { coerceError } from "../protocol";

const RETRY_MIN_MS = 5;
const RETRY_MAX_MS = 200;

export class Outbox {
  private readonly queue: Buffer[][] = [];
  private draining = false;
  private closed = false;
  private retryTimer: NodeJS.Timeout | undefined;
  private wakeRetry: (() => void) | undefined;
  private idleWaiters: (() => void)[] = [];

  constructor(
    private readonly socket: Dealer,
    private readonly onSendError: (err: Error) => void,
  ) {}

  /** Messages queued here and not yet handed to libzmq. */
  get size(): number {
    return this.queue.length;
  }

  push(frames: Buffer[]): void {
    if (this.closed) return;
    this.queue.push(frames);
    if (!this.draining) void this.drain();
  }

  /** Resolves once everything queued has been handed to libzmq, or after `timeoutMs`. */
  whenIdle(timeoutMs: number): Promise<void> {
    if (this.closed || (!this.draining && this.queue.length === 0)) return Promise.resolve();
    return new Promise((resolve) => {
      const timer = setTimeout(done, timeoutMs);
      const waiter = (): void => done();
      function done(): void {
        clearTimeout(timer);
        resolve();
      }
      this.idleWaiters.push(waiter);
    });
  }

  /** Drops whatever is still queued; the socket itself is closed by its owner. */
  close(): void {
    this.closed = true;
    this.queue.length = 0;
    if (this.retryTimer) clearTimeout(this.retryTimer);
    this.retryTimer = undefined;
    this.wakeRetry?.();
    this.notifyIdle();
  }

  private async drain(): Promise<void> {
    this.draining = true;
    let retryMs = RETRY_MIN_MS;
    try {
      while (!this.closed && this.queue.length > 0) {
        const frames = this.queue[0]!;
        try {
          await this.socket.send(frames);
          this.queue.shift();
          retryMs = RETRY_MIN_MS;
        } catch (e) {
          if (this.closed) break;
          const err = coerceError(e);
          if ((err as { code?: unknown }).code === "EAGAIN") {
            await this.pause(retryMs);
            retryMs = Math.min(retryMs * 2, RETRY_MAX_MS);
            continue;
          }
          this.queue.shift();
          this.onSendError(err);
        }
      }
    } finally {
      this.draining = false;
      this.notifyIdle();
    }
  }

  private pause(ms: number): Promise<void> {
    return new Promise((resolve) => {
      this.wakeRetry = () => {
        this.wakeRetry = undefined;
        resolve();
      };
      this.retryTimer = setTimeout(() => {
        this.retryTimer = undefined;
        this.wakeRetry?.();
      }, ms);
    });
  }

  private notifyIdle(): void {
    if (this.draining && !this.closed) return;
    const waiters = this.idleWaiters;
    this.idleWaiters = [];
    for (const w of waiters) w();
  }
}
