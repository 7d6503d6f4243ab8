/**
 * Every attempt's local lease on one timer. A setTimeout per attempt (and the
 * closure it called) was a visible part of a pool's CPU per step, for a timer
 * that almost never fires: the step ends first and the timer is cleared.
 *
 * Leases of the same length are kept in one list in the order they were armed,
 * which is also the order they fall due (the clock only moves forward), so arming
 * is an append and clearing an unlink: no sorting, no allocation (the links live
 * on the leased object itself). One Node timer is set for the earliest due lease
 * of all lists; when it fires, every lease then due expires, in due order within
 * each length, and the timer is set for the next. It is cleared once no lease is
 * armed, so an idle pool holds no timer.
 */

/** The links a leased object carries (HandlerPool's Attempt). */
export interface Leased {
  leaseDue: number;
  leasePrev: Leased | undefined;
  leaseNext: Leased | undefined;
  leaseLane: LeaseLane | undefined;
}

/** The armed leases of one length, earliest first. */
export interface LeaseLane {
  readonly ms: number;
  head: Leased | undefined;
  tail: Leased | undefined;
}

export class LeaseTimers<T extends Leased> {
  private readonly lanes = new Map<number, LeaseLane>();
  private timer: NodeJS.Timeout | undefined;
  /** When `timer` fires (performance.now() scale); Infinity without one. */
  private timerDue = Number.POSITIVE_INFINITY;

  constructor(private readonly onExpired: (item: T) => void) {}

  /** Whether the one Node timer is set (it is whenever a lease is armed, and may be a while after). */
  get scheduled(): boolean {
    return this.timer !== undefined;
  }

  /** Arms (or re-arms) `item`'s lease to expire `ms` from now. */
  arm(item: T, ms: number): void {
    this.clear(item);
    let lane = this.lanes.get(ms);
    if (lane === undefined) {
      lane = { ms, head: undefined, tail: undefined };
      this.lanes.set(ms, lane);
    }
    item.leaseDue = performance.now() + ms;
    item.leaseLane = lane;
    item.leasePrev = lane.tail;
    item.leaseNext = undefined;
    if (lane.tail === undefined) lane.head = item;
    else lane.tail.leaseNext = item;
    lane.tail = item;
    if (item.leaseDue < this.timerDue) this.schedule(item.leaseDue);
  }

  /** Clears `item`'s lease, if armed. */
  clear(item: T): void {
    const lane = item.leaseLane;
    if (lane === undefined) return;
    const { leasePrev: prev, leaseNext: next } = item;
    if (prev === undefined) lane.head = next;
    else prev.leaseNext = next;
    if (next === undefined) lane.tail = prev;
    else next.leasePrev = prev;
    item.leaseLane = item.leasePrev = item.leaseNext = undefined;
    // The timer stays set: firing with nothing due only sets it for the next lease, or clears it.
  }

  /** Clears every lease and the timer. */
  clearAll(): void {
    for (const lane of this.lanes.values()) while (lane.head !== undefined) this.clear(lane.head as T);
    this.lanes.clear();
    this.unschedule();
  }

  private schedule(due: number): void {
    this.unschedule();
    this.timerDue = due;
    this.timer = setTimeout(() => this.fire(), Math.max(1, Math.ceil(due - performance.now())));
  }

  private unschedule(): void {
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
    this.timerDue = Number.POSITIVE_INFINITY;
  }

  private fire(): void {
    this.timer = undefined;
    this.timerDue = Number.POSITIVE_INFINITY;
    const now = performance.now();
    const due: T[] = [];
    for (const lane of this.lanes.values()) {
      for (let item = lane.head; item !== undefined && item.leaseDue <= now; item = lane.head) {
        this.clear(item as T);
        due.push(item as T);
      }
    }
    let next = Number.POSITIVE_INFINITY;
    for (const [ms, lane] of this.lanes) {
      if (lane.head === undefined) this.lanes.delete(ms);
      else next = Math.min(next, lane.head.leaseDue);
    }
    if (next < this.timerDue) this.schedule(next);
    // After the lists and the timer are settled: an expiry may arm or clear other leases
    // (arm() moves the timer earlier itself). One that throws does not keep the others from
    // expiring; the first error then leaves this callback as it would have left its own timer's.
    let failed = false;
    let failure: unknown;
    for (const item of due) {
      try {
        this.onExpired(item);
      } catch (e) {
        if (!failed) failure = e;
        failed = true;
      }
    }
    if (failed) throw failure;
  }
}
