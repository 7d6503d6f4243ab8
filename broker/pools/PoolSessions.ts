/**
 * The pool verbs: HELLO (registration, session check, adoption of what a
 * reconnecting pool still holds), PROGRESS (lease extension), DISCONNECT
 * (draining), a pool's ERROR, heartbeats both ways, and purging a pool that
 * went silent or was dropped. Pool records change only through the registry.
 */
import { createHash } from "node:crypto";
import { BrokerCommands, CancelReasons, fault, type BodyOf, type Encoding } from "../../protocol";
import type { BrokerContext } from "../BrokerContext";
import type { PeerIdentities } from "../transport/PeerIdentities";
import { identityKey, type InFlight, type PoolRecord } from "./PoolRegistry";
import { refuseForeign, type ForeignAttempt } from "./refuseForeign";

/** What the pool verbs need from the peer guard: a bad-message count per peer. */
export interface StrikeCounter {
  /** The peer sent something healthy: its count of bad messages in a row starts again. */
  forgive(key: string): void;
  strike(identity: Buffer, pool: PoolRecord | undefined): void;
}

export class PoolSessions {
  /** Attempts pools reclaimed in HELLO.running since this life started (orphan recovery keeps them). */
  readonly adopted = new Set<string>();
  /** Attempts of pools whose connection was lost, kept leased for a reconnect to reclaim: timer -> attempt ids. */
  private readonly awaitingReconnect = new Map<NodeJS.Timeout, string[]>();

  constructor(
    private readonly ctx: BrokerContext,
    private readonly identities: PeerIdentities,
    private readonly strikes: StrikeCounter,
  ) {}

  async hello(identity: Buffer, key: string, hello: BodyOf<"HELLO">): Promise<void> {
    const { ctx } = this;
    // What a pool holds is found by its routing id, and what the database records by its pool_id:
    // they must be one name, or a pool could speak for another.
    const ownId = this.identities.routingIdOf(identity);
    if (!ownId.equals(Buffer.from(hello.pool_id, "utf8"))) {
      const routingId = ownId.toString("utf8");
      ctx.log.warn(
        { peer: key, pool_id: hello.pool_id, routing_id: routingId },
        `refused HELLO: pool_id ${JSON.stringify(hello.pool_id)} is not the routing id ${JSON.stringify(routingId)} it came from`,
      );
      return ctx.sendError(
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
    const taken = await ctx.state.takePoolSession(hello.pool_id, sessionHash ?? null);
    if (taken === "held") {
      this.refuseSession(identity, hello.pool_id, "has attempts in flight");
      return;
    }
    // Checked again: another HELLO for this routing id may have registered while we asked the database.
    if (!this.sessionMayHold(identity, hello.pool_id, sessionHash, "is connected")) return;
    const previous = ctx.pools.get(key);
    const running = new Set(hello.running ?? []);
    if (previous) {
      // A reconnect: whatever the pool no longer holds goes back at once.
      const held = ctx.pools.remove(key);
      const lost = held.filter((f) => !running.has(f.attemptId)).map((f) => f.attemptId);
      if (lost.length > 0) await ctx.release(lost, true, "pool reconnected without it");
    }
    const encoding: Encoding = hello.encoding ?? "json";
    const adopted =
      running.size > 0 ? await ctx.state.adoptAttempts([...running], ctx.id, hello.pool_id) : [];
    // Listed attempts that were sent to another pool stay that pool's; the sender hears why after WELCOME.
    const adoptedIds = new Set(adopted.map((a) => a.attemptId));
    const notAdopted = [...running].filter((id) => !adoptedIds.has(id));
    const foreign =
      notAdopted.length > 0 ? await ctx.state.foreignAttempts(notAdopted, hello.pool_id) : new Map();
    const pool = ctx.pools.register(identity, hello, encoding, Date.now(), sessionHash);
    for (const a of adopted) {
      this.adopted.add(a.attemptId);
      if (!pool.handlers.has(a.handler)) continue;
      ctx.pools.addInFlight(pool, { ...a, children: 0, sentAt: Date.now() });
    }
    ctx.send(
      identity,
      BrokerCommands.WELCOME,
      {
        broker_id: ctx.id,
        encoding,
        heartbeat_ms: ctx.opts.heartbeatMs,
        heartbeat_liveness: ctx.opts.heartbeatLiveness,
        max_message_bytes: ctx.opts.maxMessageBytes,
        max_batch: ctx.opts.maxBatch,
        adopted: adopted.map((a) => a.attemptId),
      },
      "json",
    );
    refuseForeign(
      ctx,
      pool,
      "HELLO",
      [...foreign].map(([attemptId, owner]) => ({ attemptId, owner })),
    );
    ctx.log.info(
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
    ctx.kick();
  }

  async progress(pool: PoolRecord, body: BodyOf<"PROGRESS">): Promise<void> {
    const { ctx } = this;
    const own: string[] = [];
    const refused: ForeignAttempt[] = [];
    for (const p of body.progress) {
      const holder = ctx.pools.holderOf(p.attempt_id);
      const flight = holder?.inFlight.get(p.attempt_id);
      if (holder && holder !== pool) refused.push({ attemptId: p.attempt_id, owner: holder.poolId, flight });
      else own.push(p.attempt_id);
    }
    const notExtended = own.length > 0 ? await ctx.state.extendLeases(own, pool.poolId) : [];
    // Not extended: its lease is gone, or the database records it as another pool's.
    const foreign =
      notExtended.length > 0 ? await ctx.state.foreignAttempts(notExtended, pool.poolId) : new Map();
    for (const [attemptId, owner] of foreign) refused.push({ attemptId, owner });
    refuseForeign(ctx, pool, "PROGRESS", refused);
    const refusedIds = new Set(refused.map((r) => r.attemptId));
    for (const p of body.progress) {
      if (refusedIds.has(p.attempt_id)) continue;
      const flight = pool.inFlight.get(p.attempt_id);
      ctx.log.debug(
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
      for (const id of lost) if (ctx.pools.holds(pool, id)) ctx.pools.takeInFlight(id);
      ctx.sendCancel(pool, lost, CancelReasons.LEASE_LOST);
    }
  }

  /** A pool's HEARTBEAT: with `cancelling`, the slots its cancelled handlers still hold. */
  heartbeat(pool: PoolRecord, body: BodyOf<"HEARTBEAT">): void {
    if (body.cancelling === undefined) return;
    const before = this.ctx.pools.credit(pool);
    this.ctx.pools.noteCancelling(pool, body.cancelling);
    if (this.ctx.pools.credit(pool) > before) this.ctx.kick(pool);
  }

  /**
   * An attempt of the pool timed out (Maintenance). Logs, once, a pool that
   * this timeout quarantined.
   */
  timedOut(pool: PoolRecord, flight: InFlight): void {
    const { ctx } = this;
    if (!ctx.pools.noteTimedOut(pool, flight)) return;
    ctx.log.warn(
      { pool_id: pool.poolId, timeouts: pool.timeoutsInARow, cancelling: pool.lingering.size },
      `pool ${pool.poolId} quarantined: its last ${pool.timeoutsInARow} attempts timed out and none completed since; ` +
        "it gets no new work until it completes one or reconnects. Look for a handler that never returns or ignores its abort signal",
    );
  }

  leaving(pool: PoolRecord, body: BodyOf<"DISCONNECT">): void {
    const { ctx } = this;
    ctx.pools.drain(pool);
    const handedBack: string[] = [];
    const refused: ForeignAttempt[] = [];
    for (const id of body.handed_back ?? []) {
      const holder = ctx.pools.holderOf(id);
      if (holder === pool) {
        ctx.pools.takeInFlight(id);
        handedBack.push(id);
      } else if (holder) {
        refused.push({ attemptId: id, owner: holder.poolId, flight: holder.inFlight.get(id) });
      }
    }
    refuseForeign(ctx, pool, "DISCONNECT", refused);
    if (handedBack.length > 0) void ctx.release(handedBack, false, "pool handed it back");
    ctx.log.info(
      {
        pool_id: pool.poolId,
        handed_back: handedBack.length,
        in_flight: pool.inFlight.size,
        reason: body.reason,
      },
      `pool ${pool.poolId} is leaving${body.reason ? ` (${body.reason})` : ""}; ${pool.inFlight.size} attempts still to finish`,
    );
    if (pool.inFlight.size === 0) this.forgetDrained(pool);
    ctx.kick();
  }

  /** A draining pool with nothing left in flight is forgotten. */
  forgetDrained(pool: PoolRecord): void {
    // Kept while results wait for ACK, so the ACK finds its encoding; dropped after.
    this.ctx.pools.remove(pool.key);
    this.ctx.log.info({ pool_id: pool.poolId }, `pool ${pool.poolId} disconnected`);
  }

  peerError(identity: Buffer, pool: PoolRecord | undefined, body: BodyOf<"ERROR">): void {
    const { ctx } = this;
    const key = identityKey(identity);
    const attemptId = body.attempt_id;
    const flight: InFlight | undefined = attemptId ? pool?.inFlight.get(attemptId) : undefined;
    ctx.limiter.write(
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
      this.strikes.forgive(key);
      ctx.pools.takeInFlight(attemptId);
      void ctx.release([attemptId], true, `pool ${pool.poolId} could not take it: ${body.code}`);
      return;
    }
    // Any other ERROR is a bad message like any other: a peer that floods them is dropped.
    this.strikes.strike(identity, pool);
  }

  /** Purges pools silent for longer than heartbeat liveness allows, and heartbeats the others when due. */
  heartbeatTick(now: number): void {
    const { ctx } = this;
    const deadAfter = ctx.opts.heartbeatMs * ctx.opts.heartbeatLiveness;
    for (const pool of [...ctx.pools.all()]) {
      if (now - pool.lastSeen > deadAfter) {
        void this.purge(pool, "missed heartbeats");
      } else if (now - pool.lastSent >= ctx.opts.heartbeatMs) {
        ctx.send(pool.identity, BrokerCommands.HEARTBEAT, { in_flight: pool.inFlight.size }, pool.encoding);
      }
    }
  }

  /** The broker was stalled: no pool is to blame for the silence, so every liveness clock restarts now. */
  restartLivenessClocks(now: number): void {
    for (const pool of this.ctx.pools.all()) this.ctx.pools.touch(pool, now);
  }

  /**
   * A send to the pool failed: its connection is gone. A pool that lost the
   * broker for a while (a network blip, a broker that stalled) reconnects with
   * a new connection and lists what it still runs in HELLO, so its attempts
   * stay leased for one liveness period for that HELLO to reclaim; those no
   * pool reclaimed by then go back to ready, each counting as an attempt.
   */
  connectionLost(pool: PoolRecord, why: string): void {
    const { ctx } = this;
    if (!ctx.pools.isCurrent(pool)) return;
    const flights = ctx.pools.remove(pool.key);
    const handlerOf = new Map(flights.map((f) => [f.attemptId, f.handler]));
    const held = flights.map((f) => f.attemptId);
    const graceMs = ctx.opts.heartbeatMs * ctx.opts.heartbeatLiveness;
    ctx.log.warn(
      { pool_id: pool.poolId, in_flight: held.length, reason: why, grace_ms: graceMs },
      `pool ${pool.poolId} lost (${why}); its ${held.length} in-flight attempts wait ${graceMs} ms for it to reconnect and reclaim them`,
    );
    ctx.kick();
    if (held.length === 0) return;
    const timer = setTimeout(() => {
      this.awaitingReconnect.delete(timer);
      const unclaimed = held.filter((id) => ctx.pools.holderOf(id) === undefined);
      if (unclaimed.length === 0) return;
      ctx.log.warn(
        { pool_id: pool.poolId, attempts: unclaimed.length },
        `pool ${pool.poolId} did not reconnect to reclaim ${unclaimed.length} attempts; they go back to ready`,
      );
      for (const id of unclaimed)
        ctx.metrics.attemptFinished(handlerOf.get(id) ?? "unknown", pool.poolId, "lost");
      void ctx.release(unclaimed, true, `pool lost: ${why}`);
    }, graceMs);
    this.awaitingReconnect.set(timer, held);
  }

  /** Forgets a pool; its in-flight attempts go back to ready at once (each counts as an attempt). */
  async purge(pool: PoolRecord, why: string): Promise<void> {
    const { ctx } = this;
    if (!ctx.pools.isCurrent(pool)) return;
    const held = ctx.pools.remove(pool.key);
    for (const f of held) ctx.metrics.attemptFinished(f.handler, pool.poolId, "lost");
    ctx.log.warn(
      { pool_id: pool.poolId, in_flight: held.length, reason: why },
      `pool ${pool.poolId} lost (${why}); ${held.length} in-flight attempts go back to ready`,
    );
    if (held.length > 0)
      await ctx.release(
        held.map((f) => f.attemptId),
        true,
        `pool lost: ${why}`,
      );
    ctx.kick();
  }

  /** A pool verb from a peer that never said HELLO (or was forgotten): it must say HELLO first. */
  requireHello(identity: Buffer, command: string): void {
    this.ctx.sendError(
      identity,
      fault("hello_required", `${command} from a pool this broker does not know`, { command }),
    );
  }

  /**
   * At stop: every pool is forgotten and told to reconnect elsewhere; what it
   * still held is cancelled and goes back to ready without counting as an attempt.
   */
  async handBackAll(): Promise<void> {
    const { ctx } = this;
    const leftover: string[] = [];
    for (const [timer, ids] of this.awaitingReconnect) {
      clearTimeout(timer);
      leftover.push(...ids.filter((id) => ctx.pools.holderOf(id) === undefined));
    }
    this.awaitingReconnect.clear();
    for (const pool of [...ctx.pools.all()]) {
      const held = ctx.pools.remove(pool.key);
      leftover.push(...held.map((f) => f.attemptId));
      if (held.length > 0)
        ctx.sendCancel(
          pool,
          held.map((f) => f.attemptId),
          CancelReasons.SHUTDOWN,
        );
      ctx.send(
        pool.identity,
        BrokerCommands.DISCONNECT,
        { code: "shutting_down", reason: "the broker is stopping" },
        pool.encoding,
      );
    }
    if (leftover.length === 0) return;
    await ctx.release(leftover, false, "broker shutdown");
    ctx.log.info(
      { attempts: leftover.length },
      `handed back ${leftover.length} unfinished attempts at shutdown`,
    );
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
    const current = this.ctx.pools.get(identityKey(identity));
    if (current?.sessionHash === undefined || current.sessionHash === sessionHash) return true;
    this.refuseSession(identity, poolId, why);
    return false;
  }

  private refuseSession(identity: Buffer, poolId: string, why: string): void {
    this.ctx.log.warn(
      { peer: identityKey(identity), pool_id: poolId, holder_pool_id: poolId },
      `refused HELLO for pool ${poolId}: pool ${poolId} ${why} under another session, and this HELLO does not carry its secret`,
    );
    this.ctx.sendError(
      identity,
      fault("session_mismatch", `pool ${poolId} ${why} under another session`, { command: "HELLO" }),
    );
  }
}
