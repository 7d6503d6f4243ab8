/**
 * The broker: one ROUTER socket per role group, a short receive loop each,
 * one gate every message passes (PeerGuard) and one named verb per command.
 * The verbs live with the service they belong to:
 *
 *   pools/        the pool registry (the only writer of pool records) and the pool verbs
 *   dispatch/     claiming ready steps for pools with credit, and sending them
 *   completion/   RESULT intake, the group committer, and what follows a commit
 *   clients/      SUBMIT, STATUS, WAIT, CANCEL_TASK, POOLS, HISTORY, and the waiters
 *   maintenance/  timers: heartbeats, lease expiry, the poll, orphan recovery
 *   transport/    sockets, ZAP, the outbox, the peer gate
 *
 * Step and task state change only through the state manager (StatePort);
 * everything here is soft state that a restart rebuilds from HELLOs and
 * PostgreSQL.
 *
 * Lifecycle (moved only through setState):
 *   created   constructed, nothing bound
 *   running   bound, serving
 *   stopping  no new claims; in-flight attempts finish or are handed back
 *   stopped   sockets closed, timers cleared
 */
import pino, { type Logger } from "pino";
import type { Router } from "zeromq";
import { coerceError, fault, type PoolView, type TaskView } from "../protocol";
import { createContext, type BrokerContext, type BrokerState } from "./BrokerContext";
import { ClientVerbs, type SubmitResult } from "./clients/ClientVerbs";
import { Waiters } from "./clients/Waiters";
import { BatchCommit, type CommittedBatch } from "./completion/BatchCommit";
import { Committer } from "./completion/Committer";
import { ResultIntake } from "./completion/ResultIntake";
import { checkEndpoints, resolveOptions, type BrokerOptions, type ResolvedOptions } from "./config";
import { Dispatcher } from "./dispatch/Dispatcher";
import { LogLimiter } from "./LogLimiter";
import { Maintenance } from "./maintenance/Maintenance";
import type { MetricsSink } from "./metrics/MetricsSink";
import { traceSinkFromEnv } from "./metrics/TraceExporter";
import { PoolRegistry } from "./pools/PoolRegistry";
import { PoolSessions } from "./pools/PoolSessions";
import type { Role } from "./roles";
import type { CreateTaskRequest } from "./StatePort";
import { Listeners } from "./transport/Listeners";
import { PeerGuard, type Admitted } from "./transport/PeerGuard";

export type { SubmitResult } from "./clients/ClientVerbs";

const LEGAL_MOVES: Record<BrokerState, readonly BrokerState[]> = {
  created: ["running", "stopped"],
  running: ["stopping"],
  stopping: ["stopped"],
  stopped: [],
};

export class Broker {
  readonly id: string;
  readonly log: Logger;
  private readonly opts: ResolvedOptions;
  private readonly limiter: LogLimiter;
  private readonly listeners: Listeners;
  private readonly ctx: BrokerContext;
  private readonly guard: PeerGuard;
  private readonly sessions: PoolSessions;
  private readonly dispatcher: Dispatcher;
  private readonly committer: Committer<CommittedBatch>;
  private readonly intake: ResultIntake;
  private readonly waiters: Waiters;
  private readonly clients: ClientVerbs;
  private readonly maintenance: Maintenance;
  private unlisten: (() => Promise<void>) | undefined;
  private state: BrokerState = "created";
  private stopping: Promise<void> | undefined;

  constructor(options: BrokerOptions) {
    const base = options.logger ?? pino({ level: process.env.STEPBROKER_LOG_LEVEL ?? "info" });
    this.opts = resolveOptions(options, base);
    this.id = this.opts.brokerId;
    this.log = base.child({ broker_id: this.id });
    this.limiter = new LogLimiter(this.log);
    checkEndpoints(this.opts);
    this.listeners = new Listeners(this.opts, this.log);
    const outbox = this.listeners.newOutbox(
      (identity, frames) => this.dispatcher.onUndeliverable(identity, frames),
      this.limiter,
    );
    const ctx = (this.ctx = createContext({
      id: this.id,
      opts: this.opts,
      log: this.log,
      pools: new PoolRegistry(),
      limiter: this.limiter,
      outbox,
      lifecycle: () => this.state,
      kick: (creditOf, poll) => this.dispatcher.kick(creditOf, poll),
      kickAt: (when) => this.dispatcher.kickAt(when),
    }));
    ctx.traces = options.traces ?? traceSinkFromEnv(this.log);
    this.guard = new PeerGuard(ctx, this.listeners, (pool, why) => this.sessions.purge(pool, why));
    this.sessions = new PoolSessions(ctx, this.listeners.identities, this.guard);
    this.dispatcher = new Dispatcher(ctx, (pool, why) => this.sessions.connectionLost(pool, why));
    this.waiters = new Waiters(ctx);
    this.clients = new ClientVerbs(ctx, this.waiters, (identity) => this.listeners.rolesOf(identity));
    const batch = new BatchCommit(
      ctx,
      this.dispatcher,
      (taskId, state) => void this.waiters.taskFinished(taskId, state),
      () => this.intake.noteDrained(),
    );
    this.committer = new Committer(
      (items) => batch.store(items),
      this.opts.commitBatch,
      (r) => batch.committed(r),
      this.log,
      (r) => batch.refused(r),
      this.opts.maxPendingResults,
    );
    this.intake = new ResultIntake(
      ctx,
      this.committer,
      (pool) => this.sessions.forgetDrained(pool),
      (pool, e) => this.guard.failed("RESULT", pool.identity, e),
    );
    this.maintenance = new Maintenance(ctx, {
      timedOut: (pool, flight) => this.sessions.timedOut(pool, flight),
      heartbeat: (now) => this.sessions.heartbeatTick(now),
      sweep: (now) => this.guard.sweep(now),
      stalled: (now) => this.sessions.restartLivenessClocks(now),
      poll: () => this.waiters.refresh(),
      finished: (taskId) => void this.waiters.check(taskId),
      adopted: () => this.sessions.adopted,
    });
  }

  /** Replaces the allow-list of one socket while running, as the CLI does on SIGHUP (see Listeners). */
  setAllowedKeys(name: Role, keys: string[]): { added: string[]; removed: string[] } {
    return this.listeners.setAllowedKeys(name, keys);
  }

  /** The endpoints actually bound (with `*` ports resolved), socket by socket: pool, then client, then admin. */
  get endpoints(): string[] {
    return this.listeners.endpoints;
  }

  async start(): Promise<void> {
    if (this.state !== "created") throw new Error(`broker cannot start from state ${this.state}`);
    const startedAt = new Date();
    await this.listeners.bind();
    this.setState("running");
    this.unlisten = await this.opts.state.listen({
      onWork: () => this.dispatcher.kick(),
      onEvent: (event) => this.maintenance.onEvent(event),
    });
    await this.maintenance.start(startedAt, this.endpoints);
    this.listeners.sockets.forEach((socket, i) => void this.receiveLoop(socket, i));
    this.log.info(this.listeners.describe(), `broker listening on ${this.endpoints.join(", ")}`);
    this.dispatcher.kick();
  }

  /**
   * Stops serving: no new claims; in-flight attempts have `drainMs` to finish,
   * the rest go back to ready without counting as an attempt; pending commits
   * are flushed; pools are told to reconnect elsewhere. No step stays claimed
   * by a broker that stopped cleanly.
   */
  stop(opts: { drainMs?: number } = {}): Promise<void> {
    if (this.stopping) return this.stopping;
    if (this.state === "running") return (this.stopping = this.drainAndStop(opts.drainMs ?? 5000));
    if (this.state === "created") {
      for (const s of this.listeners.sockets) s.close();
      this.setState("stopped");
    }
    return Promise.resolve();
  }

  submit(req: CreateTaskRequest): Promise<SubmitResult> {
    return this.clients.submit(req);
  }

  status(taskId: string): Promise<TaskView | null> {
    return this.clients.status(taskId);
  }

  /** The task when it ends, or as it is when `timeoutMs` passes (finished: false); rejects if the broker stops first. */
  wait(taskId: string, timeoutMs: number): Promise<{ task: TaskView; finished: boolean } | null> {
    return this.waiters.wait(taskId, timeoutMs);
  }

  cancel(taskId: string): Promise<TaskView | null> {
    return this.clients.cancel(taskId);
  }

  listPools(): (PoolView & { pool_id: string })[] {
    return this.clients.listPools();
  }

  /** Reports what the broker does to `sink` from now on (serveHttp passes its BrokerMetrics). */
  observe(sink: MetricsSink): void {
    this.ctx.metrics = sink;
  }

  /** Handler names some connected pool serves (for explain). */
  servedHandlers(): Set<string> {
    return this.ctx.pools.servedHandlers();
  }

  private setState(next: BrokerState): void {
    if (!LEGAL_MOVES[this.state].includes(next))
      throw new Error(`Broker: illegal move ${this.state} -> ${next}`);
    this.state = next;
  }

  private async drainAndStop(drainMs: number): Promise<void> {
    this.setState("stopping");
    this.maintenance.stop();
    const deadline = Date.now() + drainMs;
    while (Date.now() < deadline && this.committer.pending + this.ctx.pools.inFlightTotal() > 0)
      await sleep(20);
    await this.dispatcher.idle();
    await this.committer.idle();
    // SUBMITs received before the stop get their replies; a database that hangs cannot hold the stop
    await Promise.race([this.clients.idle(), sleep(Math.max(deadline - Date.now(), 0) + 1000)]);
    await this.sessions.handBackAll();
    await this.maintenance.markStopped();
    this.waiters.closeAll();
    this.committer.stop();
    await Promise.race([this.ctx.outbox.flushed(), sleep(500)]);
    await this.unlisten?.().catch(() => undefined);
    this.ctx.outbox.close();
    await this.listeners.close();
    await this.ctx.traces
      .shutdown()
      .catch((e: unknown) => this.log.warn({ err: coerceError(e) }, "span export failed at stop"));
    this.setState("stopped");
    this.limiter.flush();
    this.log.info("broker stopped");
  }

  private async receiveLoop(socket: Router, index: number): Promise<void> {
    try {
      for await (const frames of socket) {
        if (this.state === "stopped") break;
        if (frames[0]) frames[0] = this.listeners.identities.tag(index, frames[0]);
        const admitted = this.guard.admit(frames);
        if (admitted) this.serve(frames[0]!, admitted);
      }
    } catch (e) {
      const code = (e as { code?: string }).code;
      if (this.state !== "stopping" && this.state !== "stopped" && code !== "EAGAIN") {
        this.log.fatal({ err: coerceError(e) }, "receive loop failed; the broker can no longer serve");
      }
    }
  }

  /** One admitted message to its verb; a verb that throws is answered with internal_error. */
  private serve(identity: Buffer, { key, pool, message: msg, encoding }: Admitted): void {
    try {
      switch (msg.command) {
        case "HELLO":
          return void this.sessions
            .hello(identity, key, msg.body)
            .catch((e) => this.guard.failed("HELLO", identity, e));
        case "RESULT":
          return pool ? this.intake.accept(pool, msg.body) : this.sessions.requireHello(identity, "RESULT");
        case "PROGRESS":
          return pool
            ? void this.sessions
                .progress(pool, msg.body)
                .catch((e) => this.guard.failed("PROGRESS", identity, e))
            : this.sessions.requireHello(identity, "PROGRESS");
        case "HEARTBEAT":
          return pool
            ? this.sessions.heartbeat(pool, msg.body)
            : this.sessions.requireHello(identity, "HEARTBEAT");
        case "DISCONNECT":
          return pool ? this.sessions.leaving(pool, msg.body) : undefined;
        case "ERROR":
          return this.sessions.peerError(identity, pool, msg.body);
        case "SUBMIT":
        case "STATUS":
        case "WAIT":
        case "CANCEL_TASK":
        case "POOLS":
        case "HISTORY":
          return void this.clients.serve(identity, msg, encoding);
        default:
          this.ctx.sendError(
            identity,
            fault("unknown_command", `${msg.command} is not accepted by the broker`),
            pool?.encoding,
          );
      }
    } catch (e) {
      this.guard.failed(msg.command, identity, e, (msg.body as { request_id?: unknown }).request_id);
    }
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
