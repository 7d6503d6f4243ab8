/**
 * A handler pool: runs the steps brokers send it, in handlers registered by
 * name, at most `capacity` at once, and keeps every result until its ACK.
 *
 * Pool states (moved only through `setState`):
 *  NEW       handlers may be registered
 *  STARTED   links are open; steps run
 *  CLOSING   close() was called: no new step starts; running ones drain
 *  CLOSED    sockets closed, timers cleared; the process can exit
 *
 * An attempt, once received, is held in `attempts` until the broker no longer
 * needs it from us: ACKed, cancelled, handed back, or not adopted after a
 * reconnect. Its phases:
 *  QUEUED    received, waiting for a free slot (only when a broker sends more
 *            than this pool's capacity, or several brokers share the slots)
 *  RUNNING   its handler is running
 *  FINISHED  its result is kept (and resent after each WELCOME) until ACK
 * A RUNNING attempt that is cancelled leaves `attempts` at once but keeps its
 * slot until its handler returns; its outcome is then dropped (the broker has
 * already said it would refuse it as stale).
 */
import { hostname } from "node:os";
import { randomBytes } from "node:crypto";
import { pino, type Logger } from "pino";
import {
  HEARTBEAT_INTERVAL_MS,
  HEARTBEAT_LIVENESS,
  MAX_VALUE_DEPTH,
  NAME_PATTERN,
  StepErrorTypes,
  coerceError,
  pointer,
  storableText,
  valueProblem,
  type AckItem,
  type CancelItem,
  type ErrorBody,
  type HelloBody,
  type ResultItem,
  type StepDispatch,
  type WelcomeBody,
} from "../protocol";
import { BrokerLink, type LinkOwner } from "./BrokerLink";
import { StepAbortedError, toWireError, type AbortCode } from "./errors";
import { LeaseTimers, type LeaseLane, type Leased } from "./LeaseTimers";
import type {
  CloseOptions,
  Handler,
  HandlerPoolOptions,
  StartOptions,
  Step,
  StepContext,
  StepTrace,
} from "./types";
import { SDK } from "./version";

export const PoolStates = {
  NEW: "new",
  STARTED: "started",
  CLOSING: "closing",
  CLOSED: "closed",
} as const;
export type PoolState = (typeof PoolStates)[keyof typeof PoolStates];

const AttemptPhases = { QUEUED: "queued", RUNNING: "running", FINISHED: "finished" } as const;
type AttemptPhase = (typeof AttemptPhases)[keyof typeof AttemptPhases];

/**
 * One received attempt. Its abort controller and its child logger are made on
 * first use: most steps end without either being touched, and building them
 * was the largest per-step cost in this pool's profile (createAbortSignal
 * first, pino's child() next). An abort before the handler reads `signal` is
 * kept, so the signal it then gets is already aborted with that reason.
 */
class Attempt implements Leased {
  phase: AttemptPhase = AttemptPhases.QUEUED;
  /** Left `attempts` while running (cancelled, handed back): its outcome is dropped. */
  released = false;
  startedAt = 0;
  // its place among the pool's leases (LeaseTimers)
  leaseDue = 0;
  leasePrev: Leased | undefined = undefined;
  leaseNext: Leased | undefined = undefined;
  leaseLane: LeaseLane | undefined = undefined;
  result: ResultItem | undefined = undefined;
  private controller: AbortController | undefined;
  private abortReason: StepAbortedError | undefined;
  private logger: Logger | undefined;

  constructor(
    readonly dispatch: StepDispatch,
    readonly link: BrokerLink,
    readonly handler: Handler<unknown, unknown, unknown>,
    private readonly poolLog: Logger,
  ) {}

  get id(): string {
    return this.dispatch.attempt_id;
  }

  /** The attempt's logger: the pool's, with task_id, step_id, attempt_id and step. */
  get log(): Logger {
    const d = this.dispatch;
    this.logger ??= this.poolLog.child({
      task_id: d.task_id,
      step_id: d.step_id,
      attempt_id: d.attempt_id,
      step: d.step_name,
    });
    return this.logger;
  }

  /** Whether `log` writes at `level`, without making the logger (a handler may have changed its level). */
  logs(level: "info" | "debug"): boolean {
    return (this.logger ?? this.poolLog).isLevelEnabled(level);
  }

  get signal(): AbortSignal {
    if (this.controller === undefined) {
      this.controller = new AbortController();
      if (this.abortReason !== undefined) this.controller.abort(this.abortReason);
    }
    return this.controller.signal;
  }

  /** The first reason wins, as AbortController.abort does. */
  abort(reason: StepAbortedError): void {
    if (this.controller === undefined) this.abortReason ??= reason;
    else if (!this.controller.signal.aborted) this.controller.abort(reason);
  }
}

type ProgressReporter = (a: Attempt, fraction: number | undefined, message: string | undefined) => void;

/**
 * The `ctx` a handler gets. Its members are getters on the class, so making
 * one per step is a plain allocation: an object literal with accessors and a
 * bound progress() per step cost more than the rest of starting a step. A
 * handler that never reads `signal` or `log` costs neither (see Attempt);
 * `progress` is bound on first read, so it may be passed around or
 * destructured as before.
 */
class AttemptContext implements StepContext {
  readonly #attempt: Attempt;
  readonly #report: ProgressReporter;
  #progress: StepContext["progress"] | undefined;

  constructor(attempt: Attempt, report: ProgressReporter) {
    this.#attempt = attempt;
    this.#report = report;
  }

  get signal(): AbortSignal {
    return this.#attempt.signal;
  }

  get log(): Logger {
    return this.#attempt.log;
  }

  get progress(): StepContext["progress"] {
    const a = this.#attempt;
    const report = this.#report;
    return (this.#progress ??= (fraction?: number, message?: string) => report(a, fraction, message));
  }
}

/** setTimeout's largest delay; longer leases are clamped to it. */
const MAX_TIMER_MS = 2 ** 31 - 1;
/** HEARTBEAT `cancelling` carries at most this many ids (heartbeat.json maxItems). */
const MAX_CANCELLING = 10_000;
/** A graceful close keeps a welcomed socket this long so the last DISCONNECT leaves. */
const GOODBYE_LINGER_MS = 100;
const GOODBYE_SEND_WAIT_MS = 250;

function defaultPoolId(): string {
  return `${hostname().slice(0, 80)}-${process.pid}-${randomBytes(3).toString("hex")}`;
}

function positiveInt(
  value: number | undefined,
  fallback: number,
  what: string,
  max = Number.MAX_SAFE_INTEGER,
): number {
  if (value === undefined) return fallback;
  if (!Number.isInteger(value) || value < 1 || value > max)
    throw new RangeError(`${what} must be an integer from 1 to ${max}, got ${value}`);
  return value;
}

export class HandlerPool {
  readonly poolId: string;
  readonly capacity: number;
  readonly log: Logger;
  private _state: PoolState = PoolStates.NEW;
  private readonly handlers = new Map<string, Handler<unknown, unknown, unknown>>();
  private readonly links: BrokerLink[];
  private readonly attempts = new Map<string, Attempt>();
  private readonly queue: Attempt[] = [];
  /** Released attempts whose handlers still run (HEARTBEAT `cancelling`): each still holds a slot. */
  private readonly lingering = new Set<Attempt>();
  private readonly leases = new LeaseTimers<Attempt>((a) => this.onLeaseExpired(a));
  /** progress() for every attempt's context: one function per pool, not one per step. */
  private readonly reportProgress: ProgressReporter = (a, fraction, message) =>
    this.progress(a, fraction, message);
  /** Handlers executing now, released ones included: what `capacity` bounds. */
  private busy = 0;
  private readonly opts: HandlerPoolOptions;
  private welcomed: { promise: Promise<void>; resolve: () => void; reject: (e: Error) => void } | undefined;
  private closing: Promise<void> | undefined;
  private changeWaiters: (() => void)[] = [];
  /**
   * Proves to the broker that a HELLO comes from this process: only a HELLO with
   * it may take over this pool_id's registration or adopt its attempts. One per
   * process, the same in every HELLO (reconnects included); never logged.
   */
  private readonly session = randomBytes(24).toString("base64url");

  constructor(opts: HandlerPoolOptions) {
    this.opts = opts;
    const endpoints = opts.endpoints ?? (opts.endpoint !== undefined ? [opts.endpoint] : []);
    if (endpoints.length === 0) throw new TypeError("HandlerPool needs `endpoint` or `endpoints`");
    if (new Set(endpoints).size !== endpoints.length)
      throw new TypeError("HandlerPool: `endpoints` lists an endpoint twice");
    this.poolId = opts.poolId ?? defaultPoolId();
    if (this.poolId.length < 1 || this.poolId.length > 128 || Buffer.byteLength(this.poolId) > 255) {
      throw new RangeError(`poolId must be 1 to 128 characters, got ${JSON.stringify(this.poolId)}`);
    }
    this.capacity = positiveInt(opts.capacity, 1, "capacity", 10_000);
    const heartbeatMs = positiveInt(
      opts.heartbeat?.intervalMs,
      HEARTBEAT_INTERVAL_MS,
      "heartbeat.intervalMs",
    );
    const liveness = positiveInt(opts.heartbeat?.liveness, HEARTBEAT_LIVENESS, "heartbeat.liveness", 100);
    const reconnectInitialMs = positiveInt(opts.reconnect?.initialMs, 100, "reconnect.initialMs");
    const reconnectMaxMs = Math.max(
      reconnectInitialMs,
      positiveInt(opts.reconnect?.maxMs, 5000, "reconnect.maxMs"),
    );
    const base = opts.logger ?? pino({ level: process.env.STEPBROKER_LOG_LEVEL ?? "info" });
    this.log = base.child({ pool_id: this.poolId });
    const owner = this.linkOwner();
    this.links = endpoints.map(
      (endpoint) =>
        new BrokerLink({
          endpoint,
          routingId: this.poolId,
          encoding: opts.encoding ?? "json",
          heartbeatMs,
          liveness,
          reconnectInitialMs,
          reconnectMaxMs,
          curve: opts.curve,
          logger: this.log,
          owner,
        }),
    );
  }

  get state(): PoolState {
    return this._state;
  }

  /** Handler names registered so far. */
  get handlerNames(): string[] {
    return [...this.handlers.keys()];
  }

  /** Registers the handler for steps whose template names `name`. Before start() only. */
  handle<
    TInputs = Record<string, unknown>,
    TContext = Record<string, unknown>,
    TConfig = Record<string, unknown>,
  >(name: string, handler: Handler<TInputs, TContext, TConfig>): this {
    if (this._state !== PoolStates.NEW)
      throw new Error(`handle("${name}"): register handlers before start()`);
    if (!NAME_PATTERN.test(name))
      throw new TypeError(`handler name ${JSON.stringify(name)} must match ${NAME_PATTERN}`);
    if (this.handlers.has(name)) throw new Error(`a handler named "${name}" is already registered`);
    if (typeof handler !== "function")
      throw new TypeError(`handle("${name}"): the handler must be a function`);
    this.handlers.set(name, handler as Handler<unknown, unknown, unknown>);
    return this;
  }

  /**
   * Connects to every endpoint and says HELLO. Resolves once a broker has
   * answered WELCOME (or at once with `{ waitForWelcome: false }`); until
   * close() the pool keeps reconnecting in the background either way. Rejects
   * if a broker rejects the HELLO (`code` "hello_rejected"; the pool still
   * retries until close()) or if close() comes first.
   */
  async start(opts: StartOptions = {}): Promise<void> {
    if (this._state !== PoolStates.NEW) throw new Error("start() may be called once");
    if (this.handlers.size === 0)
      throw new Error("register at least one handler with handle() before start()");
    this.setState(PoolStates.STARTED);
    let resolve!: () => void;
    let reject!: (e: Error) => void;
    const promise = new Promise<void>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    promise.catch(() => {}); // nobody may be waiting (waitForWelcome: false)
    this.welcomed = { promise, resolve, reject };
    this.log.info(
      { handlers: this.handlerNames, capacity: this.capacity, endpoints: this.links.map((l) => l.endpoint) },
      `pool ${this.poolId} serving ${this.handlerNames.join(", ")} with capacity ${this.capacity}`,
    );
    for (const link of this.links) link.open();
    if (opts.waitForWelcome === false) return;
    await promise;
  }

  /**
   * Leaves gracefully, in this order:
   *  1. stop taking work; steps still QUEUED (not started) are handed back and
   *     DISCONNECT {handed_back} goes to every welcomed broker at once, so no
   *     new STEP comes (a STEP already on its way is handed back too);
   *  2. running steps go on for up to `drainMs` (default 5000); their results
   *     are sent as they finish;
   *  3. the ones still running are aborted (`signal.reason.code` "pool_closing")
   *     and handed back in a second DISCONNECT; their outcomes are dropped;
   *  4. wait up to `ackTimeoutMs` for the ACKs of results sent;
   *  5. close the sockets (a welcomed one with a 100 ms linger so the last
   *     DISCONNECT leaves, others with 0) and clear every timer.
   * Results still without ACK are lost to the broker, which times out their
   * leases. Calling close() again returns the same promise.
   */
  close(opts: CloseOptions = {}): Promise<void> {
    this.closing ??= this.shutdown(opts);
    return this.closing;
  }

  // -------------------------------------------------------------- closing

  private async shutdown(opts: CloseOptions): Promise<void> {
    if (this._state === PoolStates.CLOSED) return;
    const drainMs = Math.max(0, opts.drainMs ?? 5000);
    const ackTimeoutMs = Math.max(
      0,
      opts.ackTimeoutMs ?? Math.max(...this.links.map((l) => l.terms.heartbeatMs * l.terms.liveness)),
    );
    const wasStarted = this._state === PoolStates.STARTED;
    this.setState(PoolStates.CLOSING);
    this.welcomed?.reject(new Error("the pool was closed before a broker welcomed it"));
    if (wasStarted) {
      // 1. stop taking work
      const queued = this.queue
        .splice(0)
        .filter((a) => a.phase === AttemptPhases.QUEUED && this.attempts.get(a.id) === a);
      for (const a of queued) this.forget(a, "pool closing before the step started");
      for (const link of this.links) {
        link.handBack(queued.filter((a) => a.link === link).map((a) => a.id));
        link.leave();
      }
      const running = this.held(AttemptPhases.RUNNING).length;
      this.log.info(
        `closing: handed back ${queued.length} waiting steps; waiting up to ${drainMs} ms for ${running} running`,
      );
      // 2. drain
      await this.until(() => this.held(AttemptPhases.RUNNING).length === 0, drainMs);
      // 3. abort the rest and hand it back
      const left = this.held(AttemptPhases.RUNNING);
      for (const a of left) {
        this.abort(a, "pool_closing", `the pool is closing and gave up waiting after ${drainMs} ms`);
        this.forget(a, "handed back: still running when the drain time ran out");
        a.link.handBack([a.id]);
      }
      if (left.length > 0)
        this.log.warn(
          `closing: aborted and handed back ${left.length} steps still running after ${drainMs} ms`,
        );
      // 4. acks
      const acked = await this.until(() => this.held(AttemptPhases.FINISHED).length === 0, ackTimeoutMs);
      if (!acked) {
        this.log.warn(
          `closing with ${this.held(AttemptPhases.FINISHED).length} results not acknowledged after ${ackTimeoutMs} ms`,
        );
      }
      // 5. let the goodbye leave, then close
      await Promise.all(this.links.map((l) => (l.welcomed ? l.whenSent(GOODBYE_SEND_WAIT_MS) : undefined)));
    }
    for (const link of this.links) link.close(link.welcomed ? GOODBYE_LINGER_MS : 0);
    this.leases.clearAll();
    this.attempts.clear();
    this.queue.length = 0;
    this.setState(PoolStates.CLOSED);
    this.changed();
    this.log.info(`pool ${this.poolId} closed`);
  }

  /** Waits until `done()` holds (re-checked on every attempt change) or `ms` pass; says which. */
  private until(done: () => boolean, ms: number): Promise<boolean> {
    if (done()) return Promise.resolve(true);
    return new Promise((resolve) => {
      const timer = setTimeout(() => finish(false), ms);
      const check = (): void => {
        if (done()) finish(true);
        else this.changeWaiters.push(check);
      };
      const finish = (ok: boolean): void => {
        clearTimeout(timer);
        this.changeWaiters = this.changeWaiters.filter((w) => w !== check);
        resolve(ok);
      };
      this.changeWaiters.push(check);
    });
  }

  private changed(): void {
    // called a few times per step, and almost always with no one waiting
    if (this.changeWaiters.length === 0) return;
    const waiters = this.changeWaiters;
    this.changeWaiters = [];
    for (const w of waiters) w();
  }

  // --------------------------------------------------------------- state

  private setState(next: PoolState): void {
    const legal: Record<PoolState, readonly PoolState[]> = {
      new: ["started", "closing"],
      started: ["closing"],
      closing: ["closed"],
      closed: [],
    };
    if (!legal[this._state].includes(next))
      throw new Error(`HandlerPool: illegal move ${this._state} -> ${next}`);
    this._state = next;
  }

  private held(phase: AttemptPhase, link?: BrokerLink): Attempt[] {
    const out: Attempt[] = [];
    for (const a of this.attempts.values()) if (a.phase === phase && (!link || a.link === link)) out.push(a);
    return out;
  }

  /** The attempt leaves `attempts`: the broker no longer expects anything of it from us. */
  private forget(a: Attempt, why: string): void {
    if (this.attempts.get(a.id) === a) this.attempts.delete(a.id);
    this.clearLease(a);
    if (a.phase === AttemptPhases.RUNNING) {
      a.released = true;
      this.lingering.add(a);
    }
    if (a.logs("debug")) a.log.debug(`forgot attempt: ${why}`);
    this.changed();
  }

  private abort(a: Attempt, code: AbortCode, message: string): void {
    a.abort(new StepAbortedError(code, message));
  }

  private clearLease(a: Attempt): void {
    this.leases.clear(a);
  }

  /** The local lease: `timeout_ms` from receipt, renewed by progress(). The broker's runs from dispatch, a little earlier. */
  private armLease(a: Attempt): void {
    this.leases.arm(a, Math.min(a.dispatch.timeout_ms, MAX_TIMER_MS));
  }

  private onLeaseExpired(a: Attempt): void {
    const { step_name: name, timeout_ms: ms } = a.dispatch;
    if (a.phase === AttemptPhases.QUEUED) {
      // Never started: the broker has timed it out by now; running it would only produce a stale result.
      a.log.warn(`step ${name} waited ${ms} ms for a free slot and lost its lease; dropping it`);
      this.forget(a, "lease passed while queued");
      return;
    }
    if (a.phase === AttemptPhases.RUNNING) {
      a.log.warn(`step ${name} ran ${ms} ms without progress: aborting it (its lease has passed)`);
      this.abort(a, "timeout", `no result or progress within the step's timeout of ${ms} ms`);
    }
  }

  // ------------------------------------------------------- link callbacks

  private linkOwner(): LinkOwner {
    return {
      helloFor: (link) => this.helloFor(link),
      inFlight: (link) =>
        this.held(AttemptPhases.RUNNING, link).length + this.held(AttemptPhases.QUEUED, link).length,
      cancelling: (link) =>
        [...this.lingering]
          .filter((a) => a.link === link)
          .map((a) => a.id)
          .slice(0, MAX_CANCELLING),
      onWelcome: (link, w) => this.onWelcome(link, w),
      onSteps: (link, steps) => this.onSteps(link, steps),
      onAcks: (link, acks) => this.onAcks(link, acks),
      onCancels: (link, cancels) => this.onCancels(link, cancels),
      onHelloRejected: (link, e) => this.onHelloRejected(link, e),
      replaceOversizedResult: (link, item, bytes) => this.replaceOversizedResult(link, item, bytes),
    };
  }

  private helloFor(link: BrokerLink): HelloBody {
    const running: string[] = [];
    for (const a of this.attempts.values()) if (a.link === link) running.push(a.id);
    const hello: HelloBody = {
      pool_id: this.poolId,
      handlers: this.handlerNames,
      capacity: this.capacity,
      encoding: this.opts.encoding ?? "json",
      sdk: SDK,
      running: running.slice(0, 10_000),
      session: this.session,
      // step.trace reads it (PROTOCOL.md, Trace context)
      trace_context: true,
    };
    if (this.opts.labels) hello.labels = this.opts.labels;
    return hello;
  }

  private onWelcome(link: BrokerLink, w: WelcomeBody): void {
    const adopted = new Set(w.adopted);
    for (const a of [...this.attempts.values()]) {
      if (a.link !== link) continue;
      if (a.phase === AttemptPhases.FINISHED) {
        link.queueResult(a.result!); // resend every unacknowledged result, adopted or not
      } else if (!adopted.has(a.id)) {
        // The broker has made this step ready again; a result would be refused as stale.
        if (a.phase === AttemptPhases.RUNNING) {
          a.log.warn(`step ${a.dispatch.step_name} was not adopted by broker ${w.broker_id}: aborting it`);
          this.abort(
            a,
            "not_adopted",
            "after a reconnect the broker no longer counts this attempt as this pool's",
          );
        } else {
          a.log.info(`step ${a.dispatch.step_name} was not adopted by broker ${w.broker_id}: dropping it`);
        }
        this.forget(a, "not adopted");
      }
    }
    this.welcomed?.resolve();
  }

  private onHelloRejected(link: BrokerLink, e: ErrorBody): void {
    const err = Object.assign(new Error(`broker at ${link.endpoint} rejected HELLO: ${e.message}`), {
      code: e.code,
    });
    this.welcomed?.reject(err);
  }

  private onSteps(link: BrokerLink, steps: StepDispatch[]): void {
    for (const d of steps) {
      if (this.attempts.has(d.attempt_id)) {
        this.log.warn(
          { attempt_id: d.attempt_id },
          `ignoring a second STEP for attempt ${d.attempt_id} of ${d.step_name}`,
        );
        continue;
      }
      if (this._state !== PoolStates.STARTED) {
        this.log.info({ attempt_id: d.attempt_id }, `handing back step ${d.step_name}: the pool is closing`);
        link.handBack([d.attempt_id]);
        continue;
      }
      const a = this.newAttempt(link, d);
      this.attempts.set(a.id, a);
      this.armLease(a);
      if (!this.handlers.has(d.handler)) {
        a.log.error(
          `no handler named "${d.handler}" in this pool (serving ${this.handlerNames.join(", ")}) for step ${d.step_name}`,
        );
        this.finish(a, {
          attempt_id: a.id,
          status: "error",
          error: {
            type: StepErrorTypes.UNKNOWN_HANDLER,
            message: `pool ${this.poolId} has no handler named "${d.handler}"; it serves ${this.handlerNames.join(", ")}`,
            retryable: true,
          },
          duration_ms: 0,
        });
        continue;
      }
      this.queue.push(a);
    }
    this.pump();
    const waiting = this.queue.length;
    if (waiting > 0) this.log.debug(`${waiting} steps wait for a free slot (capacity ${this.capacity})`);
  }

  private onAcks(link: BrokerLink, acks: AckItem[]): void {
    for (const { attempt_id: id, outcome } of acks) {
      const a = this.attempts.get(id);
      if (!a || a.link !== link) {
        this.log.debug({ attempt_id: id, outcome }, "ACK for an attempt this pool does not hold");
        continue;
      }
      if (a.phase !== AttemptPhases.FINISHED) {
        a.log.warn(
          { outcome },
          `ACK (${outcome}) for step ${a.dispatch.step_name} before its result was sent; ignored`,
        );
        continue;
      }
      if (outcome === "stale" || outcome === "unknown") {
        a.log.info({ outcome }, `broker refused the result of step ${a.dispatch.step_name} as ${outcome}`);
      } else {
        if (a.logs("debug"))
          a.log.debug({ outcome }, `result of step ${a.dispatch.step_name} acknowledged (${outcome})`);
      }
      this.forget(a, `ACK ${outcome}`);
    }
  }

  private onCancels(link: BrokerLink, cancels: CancelItem[]): void {
    for (const { attempt_id: id, reason } of cancels) {
      const a = this.attempts.get(id);
      if (!a || a.link !== link) {
        this.log.debug({ attempt_id: id, reason }, "CANCEL for an attempt this pool does not hold");
        continue;
      }
      const name = a.dispatch.step_name;
      if (a.phase === AttemptPhases.FINISHED) {
        a.log.debug(`CANCEL (${reason}) for step ${name} after it finished; its result stays until ACK`);
        continue;
      }
      a.log.info({ reason }, `cancelling step ${name} (${reason})`);
      if (a.phase === AttemptPhases.RUNNING)
        this.abort(a, reason, `the broker cancelled this attempt (${reason})`);
      this.forget(a, `CANCEL ${reason}`);
    }
    this.pump();
  }

  private replaceOversizedResult(link: BrokerLink, item: ResultItem, bytes: number): ResultItem {
    const replacement: ResultItem = {
      attempt_id: item.attempt_id,
      status: "error",
      error: {
        type: StepErrorTypes.OUTPUT_TOO_LARGE,
        message: `the result is ${bytes} bytes; the broker accepts at most ${link.terms.maxMessageBytes}. Store large data elsewhere and return a reference.`,
        retryable: false,
      },
    };
    if (item.duration_ms !== undefined) replacement.duration_ms = item.duration_ms;
    const a = this.attempts.get(item.attempt_id);
    if (a) {
      a.result = replacement;
      a.log.error(
        `the result of step ${a.dispatch.step_name} is ${bytes} bytes, over the broker's limit: sending output_too_large instead`,
      );
    }
    return replacement;
  }

  // ------------------------------------------------------------- running

  private newAttempt(link: BrokerLink, d: StepDispatch): Attempt {
    return new Attempt(d, link, this.handlers.get(d.handler) ?? (() => undefined), this.log);
  }

  /** Starts queued attempts while slots are free. */
  private pump(): void {
    while (this.busy < this.capacity && this._state === PoolStates.STARTED) {
      const a = this.queue.shift();
      if (!a) return;
      if (a.phase !== AttemptPhases.QUEUED || this.attempts.get(a.id) !== a) continue; // cancelled while waiting
      void this.run(a);
    }
  }

  private async run(a: Attempt): Promise<void> {
    a.phase = AttemptPhases.RUNNING;
    a.startedAt = performance.now();
    this.busy++;
    const d = a.dispatch;
    let item: ResultItem;
    try {
      const output = await a.handler(this.toStep(d), this.contextFor(a));
      item = completed(a.id, output);
    } catch (e) {
      item = { attempt_id: a.id, status: "error", error: toWireError(e) };
      if (!a.released) this.logFailure(a, e, item);
    }
    const ms = performance.now() - a.startedAt;
    item.duration_ms = Math.round(ms * 1000) / 1000;
    this.busy--;
    if (a.released && this.lingering.delete(a) && this._state === PoolStates.STARTED) {
      // The broker counts this slot as taken until a HEARTBEAT stops listing it: say so now
      // (not while closing: the link's socket may be going away).
      a.link.heartbeatNow();
    }
    if (a.released) {
      a.log.info(
        `step ${d.step_name} ended ${Math.round(ms)} ms after it started; its outcome is dropped (cancelled or handed back)`,
      );
    } else {
      if (item.status === "complete") {
        if (a.logs("info"))
          a.log.info(
            { duration_ms: item.duration_ms },
            `completed step ${d.step_name} in ${Math.round(ms)} ms (attempt ${d.attempt} of ${d.max_attempts})`,
          );
      } else if (item.error?.type === StepErrorTypes.INVALID_OUTPUT) {
        a.log.error(`step ${d.step_name} returned an output it cannot send: ${item.error.message}`);
      }
      this.finish(a, item);
    }
    this.changed();
    this.pump();
  }

  private finish(a: Attempt, item: ResultItem): void {
    this.clearLease(a);
    a.phase = AttemptPhases.FINISHED;
    a.result = item;
    a.link.queueResult(item);
    this.changed();
  }

  private logFailure(a: Attempt, thrown: unknown, item: ResultItem): void {
    const d = a.dispatch;
    const e = item.error!;
    const ms = Math.round(performance.now() - a.startedAt);
    const next = !e.retryable
      ? "permanent: no retry"
      : d.attempt < d.max_attempts
        ? `will retry${e.retry_after_ms !== undefined ? ` after ${e.retry_after_ms} ms` : ""}`
        : "no attempts left";
    a.log.warn(
      { err: coerceError(thrown), error_type: e.type, retryable: e.retryable },
      `failed step ${d.step_name} in ${ms} ms (attempt ${d.attempt} of ${d.max_attempts}): ${e.type}: ${e.message} (${next})`,
    );
  }

  private toStep(d: StepDispatch): Step<unknown, unknown, unknown> {
    const step: {
      -readonly [K in keyof Step<unknown, unknown, unknown>]: Step<unknown, unknown, unknown>[K];
    } = {
      taskId: d.task_id,
      stepId: d.step_id,
      attemptId: d.attempt_id,
      stepName: d.step_name,
      handler: d.handler,
      attempt: d.attempt,
      maxAttempts: d.max_attempts,
      timeoutMs: d.timeout_ms,
      template: d.template,
      context: d.context,
      config: d.config,
      inputs: d.inputs,
    };
    if (d.trace !== undefined) step.trace = traceOf(d.trace);
    return step;
  }

  private contextFor(a: Attempt): StepContext {
    return new AttemptContext(a, this.reportProgress);
  }

  private progress(a: Attempt, fraction: number | undefined, message: string | undefined): void {
    if (a.released || a.phase !== AttemptPhases.RUNNING || this.attempts.get(a.id) !== a) return;
    this.armLease(a);
    const item: { attempt_id: string; fraction?: number; message?: string } = { attempt_id: a.id };
    if (typeof fraction === "number" && Number.isFinite(fraction))
      item.fraction = Math.min(1, Math.max(0, fraction));
    if (typeof message === "string") item.message = message.slice(0, 1024);
    a.link.queueProgress(item);
  }
}

/**
 * The step's trace context as a handler reads it. The STEP was validated
 * against step.json on arrival, whose pattern for traceparent is
 * TRACEPARENT's, so the parts are sliced out without testing it again (that
 * regular expression was a visible part of this pool's per-step CPU).
 */
function traceOf(t: NonNullable<StepDispatch["trace"]>): StepTrace {
  const tp = t.traceparent;
  const trace: StepTrace = {
    traceparent: tp,
    traceId: tp.slice(3, 35),
    spanId: tp.slice(36, 52),
    sampled: (parseInt(tp.slice(53), 16) & 1) === 1,
  };
  return t.tracestate === undefined ? trace : { ...trace, tracestate: t.tracestate };
}

/**
 * A module function rather than a closure inside completed(): under tsx (which
 * the CLI runs through) every closure made also pays a defineProperty for its
 * name, and that one was made for every step.
 */
function invalidOutput(attemptId: string, message: string): ResultItem {
  return {
    attempt_id: attemptId,
    status: "error",
    error: {
      type: StepErrorTypes.INVALID_OUTPUT,
      message: storableText(message.slice(0, 8192)),
      retryable: false,
    },
  };
}

/**
 * The `complete` entry for a handler's return value. The output goes through
 * JSON once, so it is the same value in JSON and MessagePack (Dates become
 * strings, undefined fields vanish) and `undefined` becomes `null`: there is no
 * completion without an output. A value JSON cannot carry fails the attempt
 * permanently: retrying would produce it again.
 */
function completed(attemptId: string, output: unknown): ResultItem {
  // JSON's own answer for the values a handler returns most, without a text round trip
  if (output === undefined || output === null || typeof output === "boolean")
    return { attempt_id: attemptId, status: "complete", output: output ?? null };
  if (typeof output === "number")
    return { attempt_id: attemptId, status: "complete", output: Number.isFinite(output) ? output : null };
  let value: unknown;
  try {
    const text = JSON.stringify(output);
    value = text === undefined ? null : (JSON.parse(text) as unknown);
  } catch (e) {
    return invalidOutput(attemptId, `the handler's output is not JSON: ${coerceError(e).message}`);
  }
  // What the broker would refuse (and this pool then resend forever): say so as the step's error instead.
  const problem = valueProblem(value, MAX_VALUE_DEPTH);
  if (problem)
    return invalidOutput(
      attemptId,
      `the handler's output cannot be stored: at ${pointer(problem.path) || "(the output)"}, ${problem.what}` +
        (problem.code === "unstorable_value"
          ? " (PostgreSQL stores no U+0000 or unpaired surrogate; send bytes as base64)"
          : ""),
    );
  return { attempt_id: attemptId, status: "complete", output: value };
}
