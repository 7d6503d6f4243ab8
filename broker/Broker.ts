/**
 * The broker: one ROUTER socket per role group (config.ts planListeners), a
 * short receive loop each, one role check, and one named verb per command. Timers send heartbeats, purge silent pools, expire leases and poll
 * for work as a safety net. Step and task state change only through the
 * state manager (StatePort); everything here is soft state that a restart
 * rebuilds from HELLOs and PostgreSQL.
 *
 * Lifecycle:
 *   created   constructed, nothing bound
 *   running   bound, serving
 *   stopping  no new claims; in-flight attempts finish or are handed back
 *   stopped   socket closed, timers cleared
 */
import { createHash } from "node:crypto";
import pino, { type Logger } from "pino";
import { Router } from "zeromq";
import {
  BrokerCommands,
  CancelReasons,
  ClientCommands,
  coerceError,
  decodeMessage,
  encodeMessage,
  fault,
  faultToErrorBody,
  HARD_LIMIT_FACTOR,
  MAX_CONSECUTIVE_ERRORS,
  PoolCommands,
  PROTOCOL_VERSION,
  TaskStates,
  type BodyOf,
  type CancelReason,
  type CommandName,
  type Encoding,
  type ErrorCode,
  type Message,
  type PoolView,
  type ProtocolFault,
  type StepDispatch,
  type TaskView,
} from "../protocol";
import {
  Committer,
  UNSTORABLE_RESULT,
  type CommitReport,
  type PendingResult,
  type RefusedResult,
} from "./committer";
import {
  checkEndpoints,
  resolveOptions,
  type BrokerOptions,
  type ListenerPlan,
  type ResolvedOptions,
} from "./config";
import { Outbox } from "./outbox";
import { LogLimiter } from "./logLimiter";
import { identityKey, PoolRegistry, type InFlight, type PoolRecord } from "./poolRegistry";
import { RefusalLog } from "./refusalLog";
import { requestIdOf } from "./requestIdOf";
import { roleAllows, rolesFor, Roles, type Role } from "./roles";
import { PeerIdentities } from "./routingId";
import type { ClaimedStep, CompletionResult, CreateTaskRequest } from "./statePort";
import type { JsonObject, JsonValue, StepError } from "./state/types";
import { WorkBudget } from "./workBudget";
import { startZapHandler, type ZapDomain, type ZapHandler } from "./zap";

const ACCEPTED = new Set<string>([
  PoolCommands.HELLO,
  PoolCommands.RESULT,
  PoolCommands.PROGRESS,
  PoolCommands.HEARTBEAT,
  PoolCommands.DISCONNECT,
  PoolCommands.ERROR,
  ...Object.values(ClientCommands),
]);
/** Refused attempts named one by one in ERRORs and log lines, per message; the rest are counted. */
const MAX_NAMED_REFUSALS = 16;
const TERMINAL_TASK_STATES = new Set<string>([TaskStates.COMPLETE, TaskStates.ERROR, TaskStates.CANCELLED]);

type ResultItem = BodyOf<"RESULT">["results"][number];

type BrokerState = "created" | "running" | "stopping" | "stopped";

interface Waiter {
  done(task: TaskView, finished: boolean): void;
  timer: NodeJS.Timeout;
}

export interface SubmitResult {
  task: TaskView;
  created: boolean;
}

/** What one group commit stored; with `claim`, the pool its claimed children go to and the credit set aside for them. */
interface CommittedBatch {
  result: CompletionResult;
  claim?: { pool: PoolRecord; reserved: number };
}

export class Broker {
  readonly id: string;
  readonly log: Logger;
  private readonly opts: ResolvedOptions;
  /** One per entry of opts.listeners, in the same order: a peer's identity starts with its index. */
  private readonly sockets: Router[];
  private readonly identities: PeerIdentities;
  private readonly refusals: RefusalLog;
  private readonly outbox: Outbox;
  private readonly pools = new PoolRegistry();
  private readonly committer: Committer<CommittedBatch>;
  private readonly waiters = new Map<string, Set<Waiter>>();
  /** Consecutive bad messages per peer, and peers ignored after too many. */
  private readonly strikes = new Map<string, number>();
  private readonly ignoredUntil = new Map<string, number>();
  /** Lines about one peer, or one repeated failure, are rate-limited: a flood must not become a log flood. */
  private readonly limiter: LogLimiter;
  /** What each peer may cost in decoding per second. */
  private readonly budget: WorkBudget;
  /** Attempts pools reclaimed in HELLO.running since this life started. */
  private readonly adopted = new Set<string>();
  private readonly timers: NodeJS.Timeout[] = [];
  private zap: ZapHandler | undefined;
  private unlisten: (() => Promise<void>) | undefined;
  private state: BrokerState = "created";
  private startedAt = new Date();
  private boundEndpoints: string[] = [];
  private readonly bound: { socket: Router; endpoint: string }[] = [];
  private dispatchWanted = false;
  private dispatching: Promise<void> | undefined;
  private recovered = false;
  private kickTimer: NodeJS.Timeout | undefined;
  private nextKickAt: number | undefined;

  constructor(options: BrokerOptions) {
    const base = options.logger ?? pino({ level: process.env.STEPBROKER_LOG_LEVEL ?? "info" });
    this.opts = resolveOptions(options, base);
    this.id = this.opts.brokerId;
    this.log = base.child({ broker_id: this.id });
    this.limiter = new LogLimiter(this.log);
    this.budget = new WorkBudget({
      bytesPerSecond: this.opts.peerBytesPerSecond,
      messagesPerSecond: this.opts.peerMessagesPerSecond,
    });
    checkEndpoints(this.opts);
    this.refusals = new RefusalLog(this.log, this.opts.refusalLogIntervalMs);
    this.sockets = this.opts.listeners.map((plan) => this.newRouter(plan));
    this.identities = new PeerIdentities(this.sockets.length);
    this.outbox = new Outbox(this.sockets, this.identities, {
      onUnreachable: (identity, frames) => this.onUndeliverable(identity, frames),
      onError: (identity, err) => {
        const peer = identityKey(identity);
        this.limiter.write(
          `send:${peer}`,
          `about failed sends to ${JSON.stringify(peer)}`,
          "error",
          { err, peer },
          `send failed; the message was dropped: ${err.message}`,
        );
      },
    });
    this.committer = new Committer(
      (items) => this.commitBatch(items),
      this.opts.commitBatch,
      (r) => this.afterCommit(r),
      this.log,
      (r) => this.afterRefused(r),
    );
  }

  private newRouter(plan: ListenerPlan): Router {
    const curve = this.opts.curve;
    return new Router({
      // A send to a pool that is gone fails (EHOSTUNREACH) instead of vanishing,
      // and the step goes back to ready.
      mandatory: true,
      // With mandatory, the default (-1) would block forever on a peer with no
      // connection; 0 fails at once: EHOSTUNREACH = gone, EAGAIN = back-pressure.
      sendTimeout: 0,
      // A routing id belongs to the connection that holds it: a second connection with the same
      // id is refused while the first is up, so no peer can take over a connected pool's route
      // (and its STEPs). A pool that reconnects closes its old socket first; libzmq retries the
      // new connection until the broker has seen the old one close (PROTOCOL.md, Ownership).
      handover: false,
      // Credit bounds what the broker sends to a pool; these bound what a
      // misbehaving peer can queue.
      sendHighWaterMark: 100_000,
      receiveHighWaterMark: 100_000,
      // libzmq drops the connection of a grossly oversized message; a merely
      // oversized one reaches us and is answered with message_too_large.
      maxMessageSize: this.opts.maxMessageBytes * HARD_LIMIT_FACTOR,
      // ZMTP heartbeats catch half-open TCP; application heartbeats catch stuck loops.
      heartbeatInterval: this.opts.heartbeatMs,
      heartbeatTimeout: this.opts.heartbeatMs * this.opts.heartbeatLiveness,
      linger: 0,
      ...(curve
        ? {
            curveServer: true,
            curveSecretKey: curve.secretKey,
            curvePublicKey: curve.publicKey,
            // The ZAP handler admits a key only on the socket whose allow-list has it.
            zapDomain: plan.name,
          }
        : {}),
    });
  }

  /**
   * Replaces the allow-list of one socket ("pool", "client" or "admin") while
   * running, as the CLI does on SIGHUP; connections already admitted stay.
   */
  setAllowedKeys(name: Role, keys: string[]): { added: string[]; removed: string[] } {
    const curve = this.opts.curve;
    if (!curve || !this.zap) throw new Error("this broker does not use CURVE: there is no allow-list to set");
    if (!this.opts.listeners.some((l) => l.name === name))
      throw new Error(`this broker has no ${name} socket`);
    if (keys.length === 0 && !curve.allowAnyKey)
      throw new Error(
        `refusing an empty ${name} allow-list: it would lock every ${name} out; the old list stays`,
      );
    const diff = this.zap.setKeys(name, keys);
    this.log.info(
      { zap_domain: name, added: diff.added, removed: diff.removed, keys: keys.length },
      `${name} allow-list now has ${keys.length} keys (${diff.added.length} added, ${diff.removed.length} removed)`,
    );
    return diff;
  }

  /** The endpoints actually bound (with `*` ports resolved), socket by socket: pool, then client, then admin. */
  get endpoints(): string[] {
    return [...this.boundEndpoints];
  }

  async start(): Promise<void> {
    if (this.state !== "created") throw new Error(`broker cannot start from state ${this.state}`);
    this.startedAt = new Date();
    const curve = this.opts.curve;
    if (curve) {
      const domains = new Map<string, ZapDomain>(
        this.opts.listeners.map((l) => [l.name, { keys: l.keys, anyKey: curve.allowAnyKey ?? false }]),
      );
      this.zap = await startZapHandler(domains, this.log, this.refusals);
      this.sockets.forEach((socket, i) => void this.watchHandshakes(socket, this.opts.listeners[i]!));
    }
    for (const [i, plan] of this.opts.listeners.entries()) {
      const socket = this.sockets[i]!;
      for (const ep of plan.endpoints) {
        try {
          await socket.bind(ep);
        } catch (e) {
          const err = coerceError(e);
          const code = (e as { code?: string }).code;
          const hint =
            code === "EADDRINUSE"
              ? "another process uses this address; stop it or choose another endpoint"
              : err.message;
          for (const s of this.sockets) s.close();
          await this.zap?.close();
          throw new Error(`cannot bind ${ep}: ${hint}`, { cause: e });
        }
        const bound = socket.lastEndpoint ?? ep;
        this.boundEndpoints.push(bound);
        this.bound.push({ socket, endpoint: bound });
      }
    }
    this.state = "running";
    this.unlisten = await this.opts.state.listenForWork(() => this.kickDispatch());
    this.every(Math.max(10, Math.floor(this.opts.heartbeatMs / 2)), () => this.heartbeatTick());
    this.every(this.opts.leaseCheckMs, () => this.expireLeases());
    this.every(this.opts.pollMs, () => this.pollTick());
    this.timers.push(setTimeout(() => void this.recoverOrphans(), this.opts.recoveryGraceMs));
    this.sockets.forEach((socket, i) => void this.receiveLoop(socket, i));
    this.log.info(
      {
        endpoints: this.boundEndpoints,
        protocol: PROTOCOL_VERSION,
        sockets: this.opts.listeners.map((l) => ({
          name: l.name,
          endpoints: l.endpoints,
          roles: [...l.roles],
        })),
        curve: curve !== undefined,
      },
      `broker listening on ${this.boundEndpoints.join(", ")}`,
    );
    this.kickDispatch();
  }

  /**
   * Stops serving: no new claims; in-flight attempts have `drainMs` to finish,
   * the rest go back to ready without counting as an attempt; pending commits
   * are flushed; pools are told to reconnect elsewhere. No step stays claimed
   * by a broker that stopped cleanly.
   */
  async stop(opts: { drainMs?: number } = {}): Promise<void> {
    if (this.state !== "running") {
      if (this.state === "created") for (const s of this.sockets) s.close();
      this.state = "stopped";
      return;
    }
    this.state = "stopping";
    for (const t of this.timers) clearInterval(t);
    clearTimeout(this.kickTimer);
    const drainMs = opts.drainMs ?? 5000;
    const deadline = Date.now() + drainMs;
    while (Date.now() < deadline && this.inFlightCount() > 0) await sleep(20);
    await this.dispatching;
    await this.committer.idle();
    const leftover: InFlight[] = [];
    for (const pool of [...this.pools.all()]) {
      const held = this.pools.remove(pool.key);
      leftover.push(...held);
      if (held.length > 0)
        this.sendCancel(
          pool,
          held.map((f) => f.attemptId),
          CancelReasons.SHUTDOWN,
        );
      this.send(
        pool.identity,
        BrokerCommands.DISCONNECT,
        { code: "shutting_down", reason: "the broker is stopping" },
        pool.encoding,
      );
    }
    if (leftover.length > 0) {
      await this.release(
        leftover.map((f) => f.attemptId),
        false,
        "broker shutdown",
      );
      this.log.info(
        { attempts: leftover.length },
        `handed back ${leftover.length} unfinished attempts at shutdown`,
      );
    }
    for (const [taskId, set] of this.waiters) {
      const task = await this.opts.state.getTask(taskId, { includeSteps: true }).catch(() => null);
      for (const w of set) {
        clearTimeout(w.timer);
        if (task) w.done(task, false);
      }
    }
    this.waiters.clear();
    this.committer.stop();
    await Promise.race([this.outbox.flushed(), sleep(500)]);
    await this.unlisten?.().catch(() => undefined);
    this.outbox.close();
    // close() frees an endpoint only once libzmq's reaper thread gets to the socket, which on a busy
    // machine can be after stop() returned; an unbind frees it before, so a new broker can bind it at once.
    await Promise.all(this.bound.map((b) => b.socket.unbind(b.endpoint).catch(() => undefined)));
    for (const s of this.sockets) s.close();
    await this.zap?.close();
    this.state = "stopped";
    this.limiter.flush();
    this.log.info("broker stopped");
  }

  // ---------------------------------------------------------------- in-process API

  /** Creates a task; dispatch starts through the work listener, which the state manager calls once it commits. */
  submit(req: CreateTaskRequest): Promise<SubmitResult> {
    return this.opts.state.createTask(req);
  }

  status(taskId: string): Promise<TaskView | null> {
    return this.opts.state.getTask(taskId, { includeSteps: true });
  }

  /** Resolves with the task when it ends, or as it is when `timeoutMs` passes (finished: false). */
  async wait(taskId: string, timeoutMs: number): Promise<{ task: TaskView; finished: boolean } | null> {
    const task = await this.opts.state.getTask(taskId, { includeSteps: true });
    if (!task) return null;
    if (TERMINAL_TASK_STATES.has(task.state)) return { task, finished: true };
    return new Promise((resolve) => {
      const waiter: Waiter = {
        done: (t, finished) => resolve({ task: t, finished }),
        timer: setTimeout(() => {
          this.waiters.get(taskId)?.delete(waiter);
          void this.opts.state.getTask(taskId, { includeSteps: true }).then(
            (t) => resolve({ task: t ?? task, finished: t ? TERMINAL_TASK_STATES.has(t.state) : false }),
            () => resolve({ task, finished: false }),
          );
        }, timeoutMs),
      };
      let set = this.waiters.get(taskId);
      if (!set) this.waiters.set(taskId, (set = new Set()));
      set.add(waiter);
    });
  }

  async cancel(taskId: string): Promise<TaskView | null> {
    if (!(await this.opts.state.getTask(taskId))) return null;
    const out = await this.opts.state.cancelTask(taskId);
    const byPool = new Map<PoolRecord, string[]>();
    for (const attemptId of out.cancelledAttempts) {
      const held = this.pools.takeInFlight(attemptId);
      if (!held) continue;
      const list = byPool.get(held.pool) ?? [];
      list.push(attemptId);
      byPool.set(held.pool, list);
    }
    for (const [pool, ids] of byPool) this.sendCancel(pool, ids, CancelReasons.TASK_CANCELLED);
    this.log.info(
      { task_id: taskId, cancelled_attempts: out.cancelledAttempts.length },
      `cancelled task ${taskId}`,
    );
    this.kickDispatch();
    const task = await this.opts.state.getTask(taskId, { includeSteps: true });
    if (task) this.finishWaiters(taskId, task);
    return task;
  }

  listPools(): (PoolView & { pool_id: string })[] {
    return this.pools.view(Date.now());
  }

  /** Handler names some connected pool serves (for explain). */
  servedHandlers(): Set<string> {
    return this.pools.servedHandlers();
  }

  // ---------------------------------------------------------------- receive loop

  private async receiveLoop(socket: Router, index: number): Promise<void> {
    try {
      for await (const frames of socket) {
        if (this.state === "stopped") break;
        if (frames[0]) frames[0] = this.identities.tag(index, frames[0]);
        this.onMessage(frames);
      }
    } catch (e) {
      const code = (e as { code?: string }).code;
      if (this.state !== "stopping" && this.state !== "stopped" && code !== "EAGAIN") {
        this.log.fatal({ err: coerceError(e) }, "receive loop failed; the broker can no longer serve");
      }
    }
  }

  private onMessage(frames: Buffer[]): void {
    const identity = frames[0];
    if (!identity) return;
    const key = identityKey(identity);
    const now = Date.now();
    const ignored = this.ignoredUntil.get(key);
    if (ignored !== undefined) {
      if (now < ignored) return;
      this.ignoredUntil.delete(key);
    }
    const pool = this.pools.get(key);
    // Charged before anything is decoded: that is the work the budget bounds.
    let bytes = 0;
    for (let i = 1; i < frames.length; i++) bytes += frames[i]!.length;
    const verdict = this.budget.take(key, bytes);
    if (verdict !== "ok") {
      this.overBudget(identity, pool, verdict === "sustained");
      return;
    }
    if (pool) pool.lastSeen = now;
    const decoded = decodeMessage(frames.slice(1), { maxBytes: this.opts.maxMessageBytes, accept: ACCEPTED });
    if (!decoded.ok) {
      this.rejectMessage(identity, pool, decoded.fault, frames);
      return;
    }
    const roles = this.rolesOf(identity);
    if (!roleAllows(roles, decoded.message.command)) {
      const command = decoded.message.command;
      this.rejectMessage(
        identity,
        pool,
        fault(
          "forbidden",
          `${command} is not allowed on the ${this.listenerOf(identity).name} socket (roles: ${[...roles].join(", ")}); it is for ${rolesFor(command).join(" or ")} peers: connect to that socket, with a key on its allow-list`,
          { command },
        ),
        frames,
      );
      return;
    }
    // An ERROR is not a sign of health: notePeerError decides whether it counts as a strike.
    if (decoded.message.command !== PoolCommands.ERROR) this.strikes.delete(key);
    try {
      this.dispatchCommand(identity, key, pool, decoded.message, decoded.encoding);
    } catch (e) {
      const err = coerceError(e);
      const command = decoded.message.command;
      this.limiter.write(
        `handle:${command}:${err.message}`,
        `for "failed to handle ${command}: ${err.message}"`,
        "error",
        { err, peer: key, command },
        `failed to handle ${command}: ${err.message}`,
      );
      const requestId = (decoded.message.body as { request_id?: unknown }).request_id;
      this.send(
        identity,
        BrokerCommands.ERROR,
        faultToErrorBody(
          fault("internal_error", err.message, { command }),
          typeof requestId === "string" ? { request_id: requestId } : {},
        ),
        pool?.encoding,
      );
    }
  }

  /**
   * A message over the peer's work budget is dropped undecoded and unanswered
   * (an answer would be more work for the flood to cause); the log says so a
   * few times per interval with a count of the rest; a peer over budget
   * second after second is dropped.
   */
  private overBudget(identity: Buffer, pool: PoolRecord | undefined, sustained: boolean): void {
    const key = identityKey(identity);
    const who = pool?.poolId ?? `peer ${JSON.stringify(key)}`;
    this.limiter.write(
      `peer:${key}`,
      `from ${who}`,
      "warn",
      { peer: key, pool_id: pool?.poolId, code: "over_budget" },
      `${who} is over its work budget (${this.budget.messagesPerSecond} messages or ${this.budget.bytesPerSecond} bytes per second): ` +
        "its messages are dropped unread; send fewer, larger batches",
    );
    if (sustained) this.dropPeer(identity, pool, "over_budget");
  }

  private dispatchCommand(
    identity: Buffer,
    key: string,
    pool: PoolRecord | undefined,
    msg: Message,
    enc: Encoding,
  ): void {
    switch (msg.command) {
      case "HELLO":
        return void this.registerPool(identity, key, msg.body).catch((e) =>
          this.verbFailed("HELLO", identity, e),
        );
      case "RESULT":
        return pool ? this.acceptResults(pool, msg.body) : this.requireHello(identity, "RESULT");
      case "PROGRESS":
        return pool
          ? void this.extendProgress(pool, msg.body).catch((e) => this.verbFailed("PROGRESS", identity, e))
          : this.requireHello(identity, "PROGRESS");
      case "HEARTBEAT":
        return pool ? undefined : this.requireHello(identity, "HEARTBEAT");
      case "DISCONNECT":
        return pool ? void this.poolLeaving(pool, msg.body) : undefined;
      case "ERROR":
        return this.notePeerError(identity, pool, msg.body);
      case "SUBMIT":
      case "STATUS":
      case "WAIT":
      case "CANCEL_TASK":
      case "POOLS":
        return void this.serveClient(identity, msg, enc);
      default:
        this.sendError(
          identity,
          fault("unknown_command", `${msg.command} is not accepted by the broker`),
          pool?.encoding,
        );
    }
  }

  // ---------------------------------------------------------------- pool verbs

  private async registerPool(identity: Buffer, key: string, hello: BodyOf<"HELLO">): Promise<void> {
    // What a pool holds is found by its routing id, and what the database records by its pool_id:
    // they must be one name, or a pool could speak for another.
    const ownId = this.routingIdOf(identity);
    if (!ownId.equals(Buffer.from(hello.pool_id, "utf8"))) {
      const routingId = ownId.toString("utf8");
      this.log.warn(
        { peer: key, pool_id: hello.pool_id, routing_id: routingId },
        `refused HELLO: pool_id ${JSON.stringify(hello.pool_id)} is not the routing id ${JSON.stringify(routingId)} it came from`,
      );
      return this.sendError(
        identity,
        fault(
          "identity_mismatch",
          `pool_id ${JSON.stringify(hello.pool_id)} differs from this socket's routing id ${JSON.stringify(routingId)}`,
          { command: "HELLO" },
        ),
      );
    }
    const sessionHash =
      hello.session === undefined ? undefined : createHash("sha256").update(hello.session).digest("hex");
    if (!this.sessionMayHold(identity, hello.pool_id, sessionHash, "is connected")) return;
    const taken = await this.opts.state.takePoolSession(hello.pool_id, sessionHash ?? null);
    if (taken === "held") {
      this.refuseSession(identity, hello.pool_id, "has attempts in flight");
      return;
    }
    // Checked again: another HELLO for this routing id may have registered while we asked the database.
    if (!this.sessionMayHold(identity, hello.pool_id, sessionHash, "is connected")) return;
    const previous = this.pools.get(key);
    const running = new Set(hello.running ?? []);
    if (previous) {
      // A reconnect: whatever the pool no longer holds goes back at once.
      const held = this.pools.remove(key);
      const lost = held.filter((f) => !running.has(f.attemptId)).map((f) => f.attemptId);
      if (lost.length > 0) await this.release(lost, true, "pool reconnected without it");
    }
    const encoding: Encoding = hello.encoding ?? "json";
    const adopted =
      running.size > 0 ? await this.opts.state.adoptAttempts([...running], this.id, hello.pool_id) : [];
    // Listed attempts that were sent to another pool stay that pool's; the sender hears why after WELCOME.
    const adoptedIds = new Set(adopted.map((a) => a.attemptId));
    const notAdopted = [...running].filter((id) => !adoptedIds.has(id));
    const foreign =
      notAdopted.length > 0 ? await this.opts.state.foreignAttempts(notAdopted, hello.pool_id) : new Map();
    const pool = this.pools.register(identity, hello, encoding, Date.now(), sessionHash);
    for (const a of adopted) {
      this.adopted.add(a.attemptId);
      if (!pool.handlers.has(a.handler)) continue;
      this.pools.addInFlight(pool, { ...a, children: 0, sentAt: Date.now() });
    }
    this.send(
      identity,
      BrokerCommands.WELCOME,
      {
        broker_id: this.id,
        encoding,
        heartbeat_ms: this.opts.heartbeatMs,
        heartbeat_liveness: this.opts.heartbeatLiveness,
        max_message_bytes: this.opts.maxMessageBytes,
        max_batch: this.opts.maxBatch,
        adopted: adopted.map((a) => a.attemptId),
      },
      "json",
    );
    this.refuseForeign(
      pool,
      "HELLO",
      [...foreign].map(([attemptId, owner]) => ({ attemptId, owner })),
    );
    this.log.info(
      {
        pool_id: hello.pool_id,
        handlers: hello.handlers,
        capacity: hello.capacity,
        encoding,
        sdk: hello.sdk,
        adopted: adopted.length,
        reconnect: Boolean(previous),
        session: taken,
        window: pool.window,
      },
      `pool ${hello.pool_id} (${hello.sdk.language} ${hello.sdk.name} ${hello.sdk.version}) ${previous ? "reconnected" : "connected"}: ` +
        `${hello.handlers.join(", ")}, capacity ${hello.capacity} (credit ${pool.window} until it completes work), ${encoding}`,
    );
    this.kickDispatch();
  }

  /**
   * A HELLO may take over a registered routing id only with the session secret of the
   * registration that holds it (a pool that sent none can be taken over, as before sessions).
   */
  private sessionMayHold(
    identity: Buffer,
    poolId: string,
    sessionHash: string | undefined,
    why: string,
  ): boolean {
    const current = this.pools.get(identityKey(identity));
    if (current?.sessionHash === undefined || current.sessionHash === sessionHash) return true;
    this.refuseSession(identity, poolId, why);
    return false;
  }

  private refuseSession(identity: Buffer, poolId: string, why: string): void {
    this.log.warn(
      { peer: identityKey(identity), pool_id: poolId, holder_pool_id: poolId },
      `refused HELLO for pool ${poolId}: pool ${poolId} ${why} under another session, and this HELLO does not carry its secret`,
    );
    this.sendError(
      identity,
      fault("session_mismatch", `pool ${poolId} ${why} under another session`, { command: "HELLO" }),
    );
  }

  /**
   * Tells a pool that attempts it named were sent to another pool, and logs each with both pool
   * ids. At most MAX_NAMED_REFUSALS are named one by one; the log line counts the rest.
   */
  private refuseForeign(
    pool: PoolRecord,
    command: CommandName,
    attempts: { attemptId: string; owner: string; flight?: InFlight }[],
  ): void {
    if (attempts.length === 0) return;
    for (const { attemptId, owner, flight } of attempts.slice(0, MAX_NAMED_REFUSALS)) {
      this.log.warn(
        {
          pool_id: pool.poolId,
          owner_pool_id: owner,
          attempt_id: attemptId,
          task_id: flight?.taskId,
          step_id: flight?.stepId,
          command,
        },
        `refused ${command} from pool ${pool.poolId} for attempt ${attemptId}: it was sent to pool ${owner}`,
      );
      this.send(
        pool.identity,
        BrokerCommands.ERROR,
        faultToErrorBody(
          fault("not_your_attempt", `attempt ${attemptId} was sent to another pool`, { command }),
          { attempt_id: attemptId },
        ),
        pool.encoding,
      );
    }
    if (attempts.length > MAX_NAMED_REFUSALS) {
      this.log.warn(
        { pool_id: pool.poolId, command, refused: attempts.length },
        `refused ${command} from pool ${pool.poolId} for ${attempts.length - MAX_NAMED_REFUSALS} more attempts sent to other pools`,
      );
    }
  }

  private acceptResults(pool: PoolRecord, body: BodyOf<"RESULT">): void {
    const now = Date.now();
    const unheld: ResultItem[] = [];
    for (const r of body.results) {
      const holder = this.pools.holderOf(r.attempt_id);
      if (holder && holder !== pool) {
        // Nothing one pool sends may change another's steps.
        this.refuseForeignResults(pool, [
          { attemptId: r.attempt_id, owner: holder.poolId, flight: holder.inFlight.get(r.attempt_id) },
        ]);
        continue;
      }
      if (!holder) {
        unheld.push(r);
        continue;
      }
      this.commitResult(pool, r, now, this.pools.takeInFlight(r.attempt_id)?.flight);
    }
    // Credit came back: more work can go out while the commit runs.
    this.kickDispatch(pool);
    if (unheld.length > 0) {
      // Not in flight here (a broker restart, a lease lost): the database knows whose it was.
      void this.acceptUnheldResults(pool, unheld, now).catch((e) =>
        this.verbFailed("RESULT", pool.identity, e),
      );
    } else if (pool.draining && pool.inFlight.size === 0) this.forgetDrainedPool(pool);
  }

  private async acceptUnheldResults(pool: PoolRecord, results: ResultItem[], now: number): Promise<void> {
    const foreign = await this.opts.state.foreignAttempts(
      results.map((r) => r.attempt_id),
      pool.poolId,
    );
    const refused: { attemptId: string; owner: string }[] = [];
    for (const r of results) {
      const owner = foreign.get(r.attempt_id.toLowerCase());
      if (owner !== undefined) refused.push({ attemptId: r.attempt_id, owner });
      else this.commitResult(pool, r, now, undefined);
    }
    this.refuseForeignResults(pool, refused);
    if (pool.draining && pool.inFlight.size === 0 && this.pools.get(pool.key) === pool)
      this.forgetDrainedPool(pool);
  }

  /** Another pool's attempts: acknowledged as stale (the sender forgets them), and refused by name. */
  private refuseForeignResults(
    pool: PoolRecord,
    attempts: { attemptId: string; owner: string; flight?: InFlight | undefined }[],
  ): void {
    if (attempts.length === 0) return;
    for (let i = 0; i < attempts.length; i += this.opts.maxBatch) {
      const acks = attempts
        .slice(i, i + this.opts.maxBatch)
        .map((a) => ({ attempt_id: a.attemptId, outcome: "stale" as const }));
      this.send(pool.identity, BrokerCommands.ACK, { acks }, pool.encoding);
    }
    this.refuseForeign(
      pool,
      "RESULT",
      attempts.map(({ attemptId, owner, flight }) =>
        flight ? { attemptId, owner, flight } : { attemptId, owner },
      ),
    );
  }

  private commitResult(pool: PoolRecord, r: ResultItem, now: number, flight: InFlight | undefined): void {
    pool.unacked++;
    this.committer.add({
      poolKey: pool.key,
      identity: pool.identity,
      receivedAt: now,
      ...(flight ? { flight } : {}),
      result: {
        attemptId: r.attempt_id,
        status: r.status,
        // Validated against the schema on arrival, so it is plain JSON.
        ...(r.status === "complete" ? { output: (r.output ?? null) as JsonValue } : {}),
        ...(r.error ? { error: r.error as StepError } : {}),
        ...(r.duration_ms !== undefined ? { durationMs: r.duration_ms } : {}),
        ...(r.usage ? { usage: r.usage } : {}),
        poolId: pool.poolId,
      },
    });
  }

  /**
   * Stores a batch of results. When they may make children ready, as much of
   * one pool's credit as there are such children is set aside, and the same
   * transaction claims the children for that pool (sql/functions/complete_results.sql):
   * a child then reaches a pool without a second trip to the database after its
   * parent's result.
   */
  private async commitBatch(items: PendingResult[]): Promise<CommittedBatch> {
    const results = items.map((i) => i.result);
    const claimFor = this.childClaimPool(items);
    if (!claimFor) return { result: await this.opts.state.completeAttempts(results) };
    const { pool, limit } = claimFor;
    // Held until afterCommit has put the claimed children in flight, so no dispatch claims against it.
    this.pools.reserve(pool, limit);
    let result: CompletionResult;
    try {
      result = await this.opts.state.completeAttempts(results, {
        brokerId: this.id,
        poolId: pool.poolId,
        handlers: [...pool.handlers],
        limit,
      });
    } catch (e) {
      this.pools.unreserve(pool, limit);
      throw e;
    }
    if (result.claimed.length > 0 && !this.canSendTo(pool)) {
      this.pools.unreserve(pool, limit);
      // Given back here, not later, so that stop() (which waits for the committer) waits for it too.
      await this.release(
        result.claimed.map((c) => c.attempt_id),
        false,
        "pool left before its children were sent",
      );
      return { result: { ...result, claimed: [] } };
    }
    return { result, claim: { pool, reserved: limit } };
  }

  /**
   * The pool to claim a batch's children for: the one with the most credit
   * among the pools that sent results with children (they likely serve the
   * next steps too), and how many children it may take. None when no result
   * has children, so one-step work never has credit held back.
   */
  private childClaimPool(items: PendingResult[]): { pool: PoolRecord; limit: number } | undefined {
    let children = 0;
    let best: PoolRecord | undefined;
    for (const item of items) {
      const n = item.result.status === "complete" ? (item.flight?.children ?? 0) : 0;
      if (n === 0) continue;
      children += n;
      const pool = this.pools.get(item.poolKey);
      if (pool && (!best || this.pools.credit(pool) > this.pools.credit(best))) best = pool;
    }
    if (!best || this.state !== "running") return undefined;
    const limit = Math.min(children, this.pools.credit(best));
    return limit > 0 ? { pool: best, limit } : undefined;
  }

  private afterCommit({ items, batch: { result: batch, claim }, ms }: CommitReport<CommittedBatch>): void {
    if (claim) {
      // The children first: they wait on this, the ACKs only free the pool's memory.
      const { pool, reserved } = claim;
      if (batch.claimed.length > 0 && !this.sendSteps(pool, batch.claimed)) {
        void this.release(
          batch.claimed.map((c) => c.attempt_id),
          false,
          "pool left before its children were sent",
        );
      }
      this.pools.unreserve(pool, reserved);
      // A dispatch round that found this credit set aside may have left work behind.
      if (batch.claimed.length < reserved) this.kickDispatch(pool);
    }
    const outcomes = new Map(batch.outcomes.map((o) => [o.attemptId, o.outcome]));
    const acks = new Map<
      string,
      {
        identity: Buffer;
        acks: { attempt_id: string; outcome: "stored" | "duplicate" | "stale" | "unknown" }[];
      }
    >();
    // Pools whose slow-start window grew: that credit is new, and no result will ask for it.
    const grown = new Set<PoolRecord>();
    for (const item of items) {
      const outcome = outcomes.get(item.result.attemptId) ?? "unknown";
      let entry = acks.get(item.poolKey);
      if (!entry) acks.set(item.poolKey, (entry = { identity: item.identity, acks: [] }));
      entry.acks.push({ attempt_id: item.result.attemptId, outcome });
      const pool = this.pools.get(item.poolKey);
      if (pool) pool.unacked = Math.max(0, pool.unacked - 1);
      if (pool && outcome === "stored") {
        if (pool.window < pool.capacity) grown.add(pool);
        this.pools.noteStored(pool);
      }
      this.logOutcome(item, outcome, pool?.poolId);
    }
    for (const [poolKey, { identity, acks: list }] of acks) {
      const encoding = this.pools.get(poolKey)?.encoding ?? "json";
      for (let i = 0; i < list.length; i += this.opts.maxBatch) {
        this.send(identity, BrokerCommands.ACK, { acks: list.slice(i, i + this.opts.maxBatch) }, encoding);
      }
    }
    this.log.debug(
      { results: items.length, ms: Math.round(ms * 10) / 10 },
      `committed ${items.length} results`,
    );
    if (batch.readied.length > 0) this.kickDispatch();
    for (const pool of grown) this.kickDispatch(pool);
    for (const r of batch.readied) this.kickAt(Date.parse(r.runAt));
    for (const t of batch.finishedTasks) void this.resolveFinishedTask(t.taskId, t.state);
  }

  /**
   * PostgreSQL refused one result that got past validation. The committer has
   * stored an error outcome for its attempt instead (the ACK went out with
   * it) or, failing that, dropped it: the pool hears why, by attempt_id.
   */
  private afterRefused({ item, err, reason, stored }: RefusedResult): void {
    const { result, flight } = item;
    const pool = this.pools.get(item.poolKey);
    const step = flight ? `step ${flight.stepName}` : "its step";
    const what = stored
      ? `stored error ${UNSTORABLE_RESULT} for the attempt instead; ${step} is retried by its policy`
      : `could not store an error for it either; dropped it, and ${step} is retried when the lease expires`;
    this.log.error(
      {
        err,
        task_id: flight?.taskId,
        step_id: flight?.stepId,
        attempt_id: result.attemptId,
        pool_id: pool?.poolId ?? result.poolId,
      },
      `PostgreSQL refused the ${result.status} result of attempt ${result.attemptId}; ${what}. Fix the handler's output`,
    );
    const encoding = pool?.encoding ?? "json";
    this.send(
      item.identity,
      BrokerCommands.ERROR,
      faultToErrorBody(
        fault("unstorable_value", `PostgreSQL refused the result (${reason}); ${what}`, {
          command: PoolCommands.RESULT,
        }),
        { attempt_id: result.attemptId },
      ),
      encoding,
    );
    if (!stored) {
      if (pool) pool.unacked = Math.max(0, pool.unacked - 1);
      this.send(
        item.identity,
        BrokerCommands.ACK,
        { acks: [{ attempt_id: result.attemptId, outcome: "stale" }] },
        encoding,
      );
    }
  }

  /** One readable line per stored result: "completed step process_payment in 12 ms (attempt 1 of 3)". */
  private logOutcome(item: PendingResult, outcome: string, poolId: string | undefined): void {
    const { result, flight } = item;
    const ids = {
      task_id: flight?.taskId,
      step_id: flight?.stepId,
      attempt_id: result.attemptId,
      pool_id: poolId,
    };
    const ms = result.durationMs !== undefined ? ` in ${Math.round(result.durationMs)} ms` : "";
    const step = flight ? `step ${flight.stepName}` : `attempt ${result.attemptId}`;
    const of = flight ? ` (attempt ${flight.attempt} of ${flight.maxAttempts})` : "";
    if (outcome !== "stored") {
      this.log.info(
        { ...ids, outcome },
        `result for ${step} from ${poolId ?? "a departed pool"} was ${outcome}: acknowledged and ignored`,
      );
    } else if (result.status === "complete") {
      this.log.info(ids, `completed ${step}${ms}${of}`);
    } else {
      const e = result.error;
      this.log.warn(
        { ...ids, error_type: e?.type, retryable: e?.retryable },
        `failed ${step}${ms}${of}: ${e?.type ?? "error"}: ${e?.message ?? ""}`,
      );
    }
  }

  private async extendProgress(pool: PoolRecord, body: BodyOf<"PROGRESS">): Promise<void> {
    const own: string[] = [];
    const refused: { attemptId: string; owner: string; flight?: InFlight }[] = [];
    for (const p of body.progress) {
      const holder = this.pools.holderOf(p.attempt_id);
      const flight = holder?.inFlight.get(p.attempt_id);
      if (holder && holder !== pool)
        refused.push({ attemptId: p.attempt_id, owner: holder.poolId, ...(flight ? { flight } : {}) });
      else own.push(p.attempt_id);
    }
    const notExtended = own.length > 0 ? await this.opts.state.extendLeases(own, pool.poolId) : [];
    // Not extended: its lease is gone, or the database records it as another pool's.
    const foreign =
      notExtended.length > 0 ? await this.opts.state.foreignAttempts(notExtended, pool.poolId) : new Map();
    for (const [attemptId, owner] of foreign) refused.push({ attemptId, owner });
    this.refuseForeign(pool, "PROGRESS", refused);
    const refusedIds = new Set(refused.map((r) => r.attemptId));
    for (const p of body.progress) {
      if (refusedIds.has(p.attempt_id)) continue;
      const flight = pool.inFlight.get(p.attempt_id);
      this.log.debug(
        {
          pool_id: pool.poolId,
          attempt_id: p.attempt_id,
          task_id: flight?.taskId,
          step_id: flight?.stepId,
          fraction: p.fraction,
        },
        `progress on ${flight?.stepName ?? p.attempt_id}${p.message ? `: ${p.message}` : ""}`,
      );
    }
    const lost = notExtended.filter((id) => !foreign.has(id.toLowerCase()));
    if (lost.length > 0) {
      for (const id of lost) if (this.pools.holds(pool, id)) this.pools.takeInFlight(id);
      this.sendCancel(pool, lost, CancelReasons.LEASE_LOST);
    }
  }

  private poolLeaving(pool: PoolRecord, body: BodyOf<"DISCONNECT">): void {
    pool.draining = true;
    const handedBack: string[] = [];
    const refused: { attemptId: string; owner: string; flight?: InFlight }[] = [];
    for (const id of body.handed_back ?? []) {
      const holder = this.pools.holderOf(id);
      if (holder === pool) {
        this.pools.takeInFlight(id);
        handedBack.push(id);
      } else if (holder) {
        const flight = holder.inFlight.get(id);
        refused.push({ attemptId: id, owner: holder.poolId, ...(flight ? { flight } : {}) });
      }
    }
    this.refuseForeign(pool, "DISCONNECT", refused);
    if (handedBack.length > 0) void this.release(handedBack, false, "pool handed it back");
    this.log.info(
      {
        pool_id: pool.poolId,
        handed_back: handedBack.length,
        in_flight: pool.inFlight.size,
        reason: body.reason,
      },
      `pool ${pool.poolId} is leaving${body.reason ? ` (${body.reason})` : ""}; ${pool.inFlight.size} attempts still to finish`,
    );
    if (pool.inFlight.size === 0) this.forgetDrainedPool(pool);
    this.kickDispatch();
  }

  private forgetDrainedPool(pool: PoolRecord): void {
    // Keep it while results wait for ACK, so the ACK finds its encoding; drop after.
    this.pools.remove(pool.key);
    this.log.info({ pool_id: pool.poolId }, `pool ${pool.poolId} disconnected`);
  }

  private notePeerError(identity: Buffer, pool: PoolRecord | undefined, body: BodyOf<"ERROR">): void {
    const key = identityKey(identity);
    const attemptId = body.attempt_id;
    const flight = attemptId ? pool?.inFlight.get(attemptId) : undefined;
    this.limiter.write(
      `peer:${key}`,
      `from ${pool?.poolId ?? `peer ${JSON.stringify(key)}`}`,
      "warn",
      {
        peer: key,
        pool_id: pool?.poolId,
        code: body.code,
        command: body.command,
        attempt_id: attemptId,
        task_id: flight?.taskId,
        step_id: flight?.stepId,
      },
      `peer ${pool?.poolId ?? key} reported ${body.code}: ${body.message}`,
    );
    if (pool && attemptId && flight) {
      // The pool could not read one of the steps we sent it: put that step back
      // now rather than after its lease. The attempt counts, so a step the pool
      // can never read ends in error instead of bouncing forever. This is the
      // one ERROR a healthy pool sends, and each attempt can be named only once.
      this.strikes.delete(key);
      this.pools.takeInFlight(attemptId);
      void this.release([attemptId], true, `pool ${pool.poolId} could not take it: ${body.code}`);
      return;
    }
    // Any other ERROR is a bad message like any other: a peer that floods them is dropped.
    this.strike(identity, pool);
  }

  private listenerOf(identity: Buffer): ListenerPlan {
    return this.opts.listeners[this.identities.socketOf(identity)] ?? this.opts.listeners[0]!;
  }

  /** A peer's own routing id (a pool's routingId), whichever socket it is on. */
  private routingIdOf(identity: Buffer): Buffer {
    return this.identities.routingIdOf(identity);
  }

  private rolesOf(identity: Buffer): ReadonlySet<Role> {
    return this.listenerOf(identity).roles;
  }

  /**
   * Logs refused CURVE handshakes that never reach the ZAP handler (no key,
   * a wrong server key, another mechanism). libzmq reports them with the
   * listener's endpoint, not the peer's address, so they are rate-limited per
   * socket and reason; unknown keys are logged by the ZAP handler per address.
   */
  private async watchHandshakes(socket: Router, plan: ListenerPlan): Promise<void> {
    try {
      for await (const ev of socket.events) {
        if (ev.type !== "handshake:error:protocol" && ev.type !== "handshake:error:other") continue;
        const err: Error & { code?: string } = ev.error;
        const reason = err.code ?? err.message;
        const why =
          reason === "ERR_ZMTP_MECHANISM_MISMATCH"
            ? "the peer does not use CURVE (no key, or NULL/PLAIN): give it a key pair and the broker's public key"
            : reason === "ERR_ZMTP_CRYPTOGRAPHIC"
              ? "the peer's handshake does not decrypt: it probably uses a wrong broker public key"
              : `handshake failed: ${err.message}`;
        this.refusals.warn(
          `handshake:${plan.name}:${ev.address}:${reason}`,
          { zap_domain: plan.name, endpoint: ev.address, reason },
          `refused a peer on the ${plan.name} socket ${ev.address}: ${why}`,
        );
      }
    } catch (e) {
      if (this.state === "running") this.log.warn({ err: coerceError(e) }, "stopped watching handshakes");
    }
  }

  private requireHello(identity: Buffer, command: string): void {
    this.sendError(
      identity,
      fault("hello_required", `${command} from a pool this broker does not know`, { command }),
    );
  }

  private rejectMessage(
    identity: Buffer,
    pool: PoolRecord | undefined,
    f: ProtocolFault,
    frames: Buffer[],
  ): void {
    const key = identityKey(identity);
    const who = pool?.poolId ?? "peer " + JSON.stringify(key);
    // A client matches answers by request_id: echo it whenever the envelope gives it away.
    const requestId = requestIdOf(f, frames[3]);
    this.limiter.write(
      `peer:${key}`,
      `from ${who}`,
      "warn",
      {
        peer: key,
        pool_id: pool?.poolId,
        code: f.code,
        command: f.command,
        schema_path: f.schemaPath,
        instance_path: f.instancePath,
        frames: frames.length - 1,
        request_id: requestId,
        strikes: (this.strikes.get(key) ?? 0) + 1,
      },
      `rejected a message from ${who}: ${f.code}`,
    );
    // Never answer an ERROR with an ERROR: two confused peers would loop.
    if (f.command !== PoolCommands.ERROR) {
      this.send(
        identity,
        BrokerCommands.ERROR,
        faultToErrorBody(f, requestId ? { request_id: requestId } : {}),
        pool?.encoding,
      );
    }
    this.strike(identity, pool);
  }

  /** One more bad message in a row from this peer; too many and it is dropped. */
  private strike(identity: Buffer, pool: PoolRecord | undefined): void {
    const key = identityKey(identity);
    const strikes = (this.strikes.get(key) ?? 0) + 1;
    // Bounded memory: peers that sent one bad message under a fresh routing id each would pile up.
    if (strikes === 1 && this.strikes.size >= MAX_TRACKED_PEERS) {
      const oldest = this.strikes.keys().next();
      if (!oldest.done) this.strikes.delete(oldest.value);
    }
    this.strikes.set(key, strikes);
    if (strikes >= MAX_CONSECUTIVE_ERRORS) this.dropPeer(identity, pool, "too_many_errors");
  }

  /** ZeroMQ cannot close one peer of a ROUTER: drop its registration and ignore it for a while. */
  private dropPeer(identity: Buffer, pool: PoolRecord | undefined, code: ErrorCode): void {
    const key = identityKey(identity);
    this.send(
      identity,
      BrokerCommands.DISCONNECT,
      { code, reason: `dropped: ${code}` },
      pool?.encoding ?? "json",
    );
    this.strikes.delete(key);
    this.budget.forget(key);
    this.ignoredUntil.set(key, Date.now() + this.opts.heartbeatMs * this.opts.heartbeatLiveness);
    if (pool) void this.purgePool(pool, code);
    const who = pool?.poolId ?? JSON.stringify(key);
    this.limiter.write(
      `drop:${key}`,
      `about dropping ${who}`,
      "warn",
      { peer: key, pool_id: pool?.poolId, code },
      `dropped peer ${who}: ${code}; its messages are ignored for ${this.opts.heartbeatMs * this.opts.heartbeatLiveness} ms`,
    );
  }

  private verbFailed(command: CommandName, identity: Buffer, e: unknown): void {
    const err = coerceError(e);
    this.limiter.write(
      `verb:${command}:${err.message}`,
      `for "failed to handle ${command}: ${err.message}"`,
      "error",
      { err, peer: identityKey(identity), command },
      `failed to handle ${command}: ${err.message}`,
    );
    this.sendError(
      identity,
      fault("internal_error", err.message, { command }),
      this.pools.get(identityKey(identity))?.encoding,
    );
  }

  // ---------------------------------------------------------------- client verbs

  private async serveClient(identity: Buffer, msg: Message, enc: Encoding): Promise<void> {
    const requestId = (msg.body as { request_id: string }).request_id;
    const reply = (body: Omit<BodyOf<"REPLY">, "request_id">): void => {
      const frames = encodeMessage("REPLY", { request_id: requestId, ...body }, enc);
      const size = frames[2]!.length;
      if (size <= this.opts.maxMessageBytes) return this.outbox.send(identity, frames);
      // The client's decoder refuses what is over the limit, so the reply would be lost and the client
      // would wait for nothing: say what happened instead, in an answer that fits.
      const task = body.task ? ` (task ${body.task.task_id} is ${body.task.state})` : "";
      this.log.warn(
        { task_id: body.task?.task_id, request_id: requestId, command: msg.command, bytes: size },
        `the REPLY to ${msg.command}${task} would be ${size} bytes, over max_message_bytes ${this.opts.maxMessageBytes}; sent reply_too_large instead`,
      );
      refuse(
        "reply_too_large",
        `The REPLY to ${msg.command} would be ${size} bytes, over max_message_bytes ${this.opts.maxMessageBytes}; the request was carried out${task}`,
      );
    };
    const refuse = (code: ErrorCode, detail: string) =>
      this.send(
        identity,
        BrokerCommands.ERROR,
        faultToErrorBody(fault(code, detail, { command: msg.command }), { request_id: requestId }),
        enc,
      );
    try {
      if (this.state !== "running") return refuse("shutting_down", "The broker is stopping");
      switch (msg.command) {
        case "SUBMIT": {
          const b = msg.body;
          const req: CreateTaskRequest = {
            namespace: b.template.namespace,
            name: b.template.name,
            context: b.context as JsonObject,
          };
          if (b.template.version !== undefined) req.version = b.template.version;
          if (b.idempotency_key !== undefined) req.idempotencyKey = b.idempotency_key;
          if (b.priority !== undefined) req.priority = b.priority;
          const out = await this.submit(req);
          return reply({ task: out.task, created: out.created });
        }
        case "STATUS": {
          const task = await this.status(msg.body.task_id);
          return task ? reply({ task }) : refuse("unknown_task", `No task ${msg.body.task_id}`);
        }
        case "WAIT": {
          const out = await this.wait(msg.body.task_id, msg.body.timeout_ms);
          return out
            ? reply({ task: out.task, finished: out.finished })
            : refuse("unknown_task", `No task ${msg.body.task_id}`);
        }
        case "CANCEL_TASK": {
          const task = await this.cancel(msg.body.task_id);
          return task ? reply({ task }) : refuse("unknown_task", `No task ${msg.body.task_id}`);
        }
        case "POOLS": {
          // Pool ids are routing ids: knowing one is a step towards impersonating that pool.
          const pools = this.listPools();
          return reply({
            pools: this.rolesOf(identity).has(Roles.ADMIN) ? pools : pools.map(({ pool_id: _id, ...p }) => p),
          });
        }
      }
    } catch (e) {
      const err = coerceError(e);
      const code = (err as { code?: string }).code;
      if (code === "unknown_template" || code === "invalid_request" || code === "unknown_task") {
        return refuse(code, err.message);
      }
      // A failure that repeats for every request (the database is down) is logged a few times with a count.
      this.limiter.write(
        `serve:${msg.command}:${err.message}`,
        `for "failed to serve ${msg.command}: ${err.message}"`,
        "error",
        { err, command: msg.command, request_id: requestId },
        `failed to serve ${msg.command}: ${err.message}`,
      );
      refuse("internal_error", err.message);
    }
  }

  private async resolveFinishedTask(taskId: string, state: string): Promise<void> {
    this.log.info({ task_id: taskId, state }, `task ${taskId} finished: ${state}`);
    if (!this.waiters.has(taskId)) return;
    const task = await this.opts.state.getTask(taskId, { includeSteps: true });
    if (task) this.finishWaiters(taskId, task);
  }

  private finishWaiters(taskId: string, task: TaskView): void {
    if (!TERMINAL_TASK_STATES.has(task.state)) return;
    const set = this.waiters.get(taskId);
    if (!set) return;
    this.waiters.delete(taskId);
    for (const w of set) {
      clearTimeout(w.timer);
      w.done(task, true);
    }
  }

  // ---------------------------------------------------------------- dispatch

  /**
   * Asks for a dispatch round; rounds never overlap, and a request during one
   * starts another. `creditOf` names a pool whose credit just came back (a
   * result arrived): if its last claim found less ready work than it could
   * take, that credit means no new work, and no round is started for it, so the
   * claim for the children a commit readies is not kept waiting behind an
   * empty one. Every other reason (new tasks, readied children, retries,
   * requeued attempts, the poll) may mean work for anyone.
   */
  private kickDispatch(creditOf?: PoolRecord): void {
    if (this.state !== "running") return;
    if (creditOf?.readyDrained) return;
    if (creditOf === undefined) for (const pool of this.pools.all()) pool.readyDrained = false;
    this.dispatchWanted = true;
    if (!this.dispatching) {
      this.dispatching = this.dispatchLoop().finally(() => {
        this.dispatching = undefined;
      });
    }
  }

  private async dispatchLoop(): Promise<void> {
    while (this.dispatchWanted && this.state === "running") {
      this.dispatchWanted = false;
      const ready = this.pools.withCredit();
      if (ready.length === 0) return;
      // Pools that have had results stored claim first; pools that have proved nothing yet (maybe
      // silent ones) get only the work they left, so a swarm of those cannot starve a working pool.
      const proven = ready.filter((p) => p.stored > 0);
      const claimed = await Promise.all(proven.map((pool) => this.dispatchToPool(pool)));
      // Handlers a proven pool still has credit for: work for them that is ready now or soon goes
      // to that pool on the next round, never to a pool on probation.
      const spare = new Set<string>();
      for (const p of proven) if (p.readyDrained) for (const h of p.handlers) spare.add(h);
      const unproven = ready.filter((p) => p.stored === 0 && [...p.handlers].some((h) => !spare.has(h)));
      if (unproven.length > 0)
        claimed.push(...(await Promise.all(unproven.map((pool) => this.dispatchToPool(pool)))));
      // A full round means more work may be waiting.
      if (claimed.some((full) => full)) this.dispatchWanted = true;
    }
  }

  /** Claims up to the pool's credit of steps it serves and sends them; true when it filled the credit. */
  private async dispatchToPool(pool: PoolRecord): Promise<boolean> {
    const credit = this.pools.credit(pool);
    if (credit === 0) return false;
    let steps: ClaimedStep[];
    // Set aside while the claim runs, so a commit meanwhile does not claim children against it.
    this.pools.reserve(pool, credit);
    try {
      steps = await this.opts.state.claimSteps({
        brokerId: this.id,
        poolId: pool.poolId,
        handlers: [...pool.handlers],
        limit: credit,
      });
    } catch (e) {
      this.log.error(
        { err: coerceError(e), pool_id: pool.poolId },
        "claiming steps failed; retrying on the next poll",
      );
      return false;
    } finally {
      this.pools.unreserve(pool, credit);
    }
    pool.readyDrained = steps.length < credit;
    if (steps.length === 0) return false;
    if (!this.sendSteps(pool, steps)) {
      // The pool left while we claimed: give the steps back untouched.
      await this.release(
        steps.map((s) => s.attempt_id),
        false,
        "pool left before dispatch",
      );
      return false;
    }
    return steps.length === credit;
  }

  /** A pool still registered, to a broker still running. */
  private canSendTo(pool: PoolRecord): boolean {
    return this.pools.get(pool.key) === pool && this.state === "running";
  }

  /** Sends claimed steps to the pool they were claimed for; false (nothing sent) when it left. */
  private sendSteps(pool: PoolRecord, steps: ClaimedStep[]): boolean {
    if (!this.canSendTo(pool)) return false;
    const now = Date.now();
    const dispatches: StepDispatch[] = steps.map(({ lease_expires_at: _lease, children, ...step }) => {
      this.pools.addInFlight(pool, {
        attemptId: step.attempt_id,
        stepId: step.step_id,
        taskId: step.task_id,
        stepName: step.step_name,
        handler: step.handler,
        attempt: step.attempt,
        maxAttempts: step.max_attempts,
        children,
        sentAt: now,
      });
      return step;
    });
    for (let i = 0; i < dispatches.length; i += this.opts.maxBatch) {
      this.send(
        pool.identity,
        BrokerCommands.STEP,
        { steps: dispatches.slice(i, i + this.opts.maxBatch) },
        pool.encoding,
      );
    }
    if (this.log.isLevelEnabled("debug")) {
      for (const s of steps) {
        this.log.debug(
          { task_id: s.task_id, step_id: s.step_id, attempt_id: s.attempt_id, pool_id: pool.poolId },
          `dispatched step ${s.step_name} to ${pool.poolId} (attempt ${s.attempt} of ${s.max_attempts})`,
        );
      }
    }
    return true;
  }

  /** A message could not be delivered: the pool is gone. Its attempts go back. */
  private onUndeliverable(identity: Buffer, frames: Buffer[]): void {
    const pool = this.pools.get(identityKey(identity));
    const command = frames[1]?.toString("latin1");
    const key = identityKey(identity);
    const fields = { peer: key, pool_id: pool?.poolId, command };
    // While stopping, pools that already left are expected. While running, a peer that sends
    // requests by the thousand and leaves would otherwise get a line for every lost answer.
    if (this.state !== "running") this.log.debug(fields, `could not deliver ${command}: the peer is gone`);
    else
      this.limiter.write(
        `gone:${key}`,
        `about undeliverable messages to ${pool?.poolId ?? JSON.stringify(key)}`,
        "warn",
        fields,
        `could not deliver ${command}: the peer is gone`,
      );
    if (pool && command === BrokerCommands.WELCOME) {
      // The pool dropped the socket it said HELLO on (no WELCOME in time) and
      // says HELLO again on a fresh one. Forget the registration but keep its
      // attempts leased, so that HELLO adopts them and their kept results are
      // stored; if it never comes back, their leases expire.
      this.pools.remove(pool.key);
    } else if (pool) void this.purgePool(pool, "unreachable");
  }

  /** Dispatches again when a retry's backoff ends, rather than waiting for the next poll. */
  private kickAt(when: number): void {
    const delay = when - Date.now();
    if (!(delay > 0) || this.state !== "running") return;
    if (this.nextKickAt !== undefined && this.nextKickAt <= when && this.nextKickAt > Date.now()) return;
    clearTimeout(this.kickTimer);
    this.nextKickAt = when;
    this.kickTimer = setTimeout(() => {
      this.nextKickAt = undefined;
      this.kickDispatch();
    }, delay + 1);
  }

  // ---------------------------------------------------------------- timers

  private heartbeatTick(): void {
    const now = Date.now();
    const deadAfter = this.opts.heartbeatMs * this.opts.heartbeatLiveness;
    for (const pool of [...this.pools.all()]) {
      if (now - pool.lastSeen > deadAfter) {
        void this.purgePool(pool, "missed heartbeats");
      } else if (now - pool.lastSent >= this.opts.heartbeatMs) {
        this.send(pool.identity, BrokerCommands.HEARTBEAT, { in_flight: pool.inFlight.size }, pool.encoding);
      }
    }
    for (const [key, until] of this.ignoredUntil) if (until < now) this.ignoredUntil.delete(key);
    this.limiter.sweep();
    this.budget.sweep(now);
  }

  /** Forgets a pool; its in-flight attempts go back to ready at once (each counts as an attempt). */
  private async purgePool(pool: PoolRecord, why: string): Promise<void> {
    if (this.pools.get(pool.key) !== pool) return;
    const held = this.pools.remove(pool.key);
    this.log.warn(
      { pool_id: pool.poolId, in_flight: held.length, reason: why },
      `pool ${pool.poolId} lost (${why}); ${held.length} in-flight attempts go back to ready`,
    );
    if (held.length > 0)
      await this.release(
        held.map((f) => f.attemptId),
        true,
        `pool lost: ${why}`,
      );
    this.kickDispatch();
  }

  private async expireLeases(): Promise<void> {
    try {
      const expired = await this.opts.state.expireLeases({ brokerId: this.id });
      if (expired.length === 0) return;
      const byPool = new Map<PoolRecord, string[]>();
      for (const x of expired) {
        const held = this.pools.takeInFlight(x.attemptId);
        this.log.warn(
          {
            attempt_id: x.attemptId,
            task_id: x.taskId,
            step_id: x.stepId,
            pool_id: held?.pool.poolId ?? x.poolId,
            next: x.state,
          },
          `step ${held?.flight.stepName ?? x.stepId} timed out (attempt ${held?.flight.attempt ?? "?"}); it is now ${x.state}`,
        );
        if (!held) continue;
        const list = byPool.get(held.pool) ?? [];
        list.push(x.attemptId);
        byPool.set(held.pool, list);
      }
      for (const [pool, ids] of byPool) this.sendCancel(pool, ids, CancelReasons.TIMEOUT);
      this.kickDispatch();
    } catch (e) {
      this.log.error({ err: coerceError(e) }, "expiring leases failed; retrying on the next tick");
    }
  }

  private async pollTick(): Promise<void> {
    this.kickDispatch();
    for (const taskId of [...this.waiters.keys()]) {
      const task = await this.opts.state.getTask(taskId, { includeSteps: true }).catch(() => null);
      if (task) this.finishWaiters(taskId, task);
    }
  }

  /**
   * After a start, attempts leased by this broker's previous life that no pool
   * reclaimed within the grace period go back to ready.
   */
  private async recoverOrphans(): Promise<void> {
    if (this.recovered || this.state !== "running") return;
    this.recovered = true;
    try {
      const { attempts } = await this.opts.state.recoverOrphans({
        brokerId: this.id,
        olderThan: this.startedAt,
        keep: [...this.adopted],
      });
      if (attempts.length > 0) {
        this.log.info(
          { attempts: attempts.length },
          `recovered ${attempts.length} attempts left in flight by a previous run`,
        );
        this.kickDispatch();
      }
    } catch (e) {
      this.recovered = false;
      this.log.error({ err: coerceError(e) }, "recovering orphaned attempts failed; retrying shortly");
      this.timers.push(setTimeout(() => void this.recoverOrphans(), this.opts.pollMs));
    }
  }

  // ---------------------------------------------------------------- sending

  private send<C extends CommandName>(
    identity: Buffer,
    command: C,
    body: BodyOf<C>,
    encoding: Encoding = "json",
  ): void {
    const pool = this.pools.get(identityKey(identity));
    if (pool) pool.lastSent = Date.now();
    this.outbox.send(identity, encodeMessage(command, body, encoding));
  }

  private sendError(identity: Buffer, f: ProtocolFault, encoding: Encoding = "json"): void {
    this.send(identity, BrokerCommands.ERROR, faultToErrorBody(f), encoding);
  }

  private sendCancel(pool: PoolRecord, attemptIds: string[], reason: CancelReason): void {
    for (let i = 0; i < attemptIds.length; i += this.opts.maxBatch) {
      const cancels = attemptIds
        .slice(i, i + this.opts.maxBatch)
        .map((attempt_id) => ({ attempt_id, reason }));
      this.send(pool.identity, BrokerCommands.CANCEL, { cancels }, pool.encoding);
    }
  }

  private async release(attemptIds: string[], countAttempt: boolean, reason: string): Promise<void> {
    try {
      await this.opts.state.releaseAttempts(attemptIds, { countAttempt, reason });
    } catch (e) {
      // The leases will expire and the steps follow their retry policy: slower, not lost.
      this.log.error(
        { err: coerceError(e), attempts: attemptIds.length, reason },
        "could not release attempts; their leases will expire instead",
      );
    }
    this.kickDispatch();
  }

  private inFlightCount(): number {
    let n = this.committer.pending;
    for (const p of this.pools.all()) n += p.inFlight.size;
    return n;
  }

  private every(ms: number, fn: () => unknown): void {
    this.timers.push(setInterval(() => void fn(), ms));
  }
}

/** Strike counts kept at once. */
const MAX_TRACKED_PEERS = 100_000;

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
