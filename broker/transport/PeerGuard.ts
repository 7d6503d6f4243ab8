/**
 * What every message passes before a verb sees it: the peer is not being
 * ignored, it is within its work budget (charged before anything is decoded),
 * the message decodes and validates, and the peer's socket allows the command.
 * A peer that sends bad messages in a row, or stays over budget, is dropped
 * and ignored for a while (ZeroMQ cannot close one peer of a ROUTER).
 */
import {
  BrokerCommands,
  ClientCommands,
  coerceError,
  decodeBody,
  decodeMessage,
  fault,
  faultToErrorBody,
  MAX_CONSECUTIVE_ERRORS,
  PoolCommands,
  salvageResults,
  type CommandName,
  type Decoded,
  type ErrorCode,
  type Encoding,
  type Message,
  type ProtocolFault,
} from "../../protocol";
import type { BrokerContext } from "../BrokerContext";
import { identityKey, type PoolRecord } from "../pools/PoolRegistry";
import type { StrikeCounter } from "../pools/PoolSessions";
import { MAX_NAMED_REFUSALS } from "../pools/refuseForeign";
import { roleAllows, rolesFor } from "../roles";
import type { Listeners } from "./Listeners";
import { requestIdOf } from "./requestIdOf";
import { WorkBudget } from "./WorkBudget";

const ACCEPTED = new Set<string>([
  PoolCommands.HELLO,
  PoolCommands.RESULT,
  PoolCommands.PROGRESS,
  PoolCommands.HEARTBEAT,
  PoolCommands.DISCONNECT,
  PoolCommands.ERROR,
  ...Object.values(ClientCommands),
]);
/** Strike counts kept at once. */
const MAX_TRACKED_PEERS = 100_000;

export interface Admitted {
  key: string;
  pool: PoolRecord | undefined;
  message: Message;
  encoding: Encoding;
}

export class PeerGuard implements StrikeCounter {
  /** Consecutive bad messages per peer, and peers ignored after too many. */
  private readonly strikes = new Map<string, number>();
  private readonly ignoredUntil = new Map<string, number>();
  /** What each peer may cost in decoding per second. */
  private readonly budget: WorkBudget;

  /** `purge` forgets a dropped pool and hands its attempts back. */
  constructor(
    private readonly ctx: BrokerContext,
    private readonly listeners: Listeners,
    private readonly purge: (pool: PoolRecord, why: string) => Promise<void>,
  ) {
    this.budget = new WorkBudget({
      bytesPerSecond: ctx.opts.peerBytesPerSecond,
      messagesPerSecond: ctx.opts.peerMessagesPerSecond,
    });
  }

  /** The message, decoded and allowed; undefined when it was dropped or refused (the peer was told). */
  admit(frames: Buffer[]): Admitted | undefined {
    const { ctx } = this;
    const identity = frames[0];
    if (!identity) return undefined;
    const key = identityKey(identity);
    const now = Date.now();
    const ignored = this.ignoredUntil.get(key);
    if (ignored !== undefined) {
      if (now < ignored) return undefined;
      this.ignoredUntil.delete(key);
    }
    const pool = ctx.pools.get(key);
    // Charged before anything is decoded: that is the work the budget bounds.
    let bytes = 0;
    for (let i = 1; i < frames.length; i++) bytes += frames[i]!.length;
    const verdict = this.budget.take(key, bytes);
    if (verdict !== "ok") {
      this.overBudget(identity, pool, verdict === "sustained");
      return undefined;
    }
    if (pool) ctx.pools.touch(pool, now);
    const first = decodeMessage(frames.slice(1), { maxBytes: ctx.opts.maxMessageBytes, accept: ACCEPTED });
    let decoded: Decoded & { ok: true };
    if (first.ok) decoded = first;
    else {
      const salvaged = this.salvage(identity, pool, first.fault, frames);
      if (!salvaged) {
        this.reject(identity, pool, first.fault, frames);
        return undefined;
      }
      if (salvaged.results.length === 0) return undefined;
      decoded = salvaged.decoded;
    }
    const command = decoded.message.command;
    const roles = this.listeners.rolesOf(identity);
    if (!roleAllows(roles, command)) {
      this.reject(
        identity,
        pool,
        fault(
          "forbidden",
          `${command} is not allowed on the ${this.listeners.listenerOf(identity).name} socket (roles: ${[...roles].join(", ")}); it is for ${rolesFor(command).join(" or ")} peers: connect to that socket, with a key on its allow-list`,
          { command },
        ),
        frames,
      );
      return undefined;
    }
    // An ERROR is not a sign of health: PoolSessions.peerError decides whether it counts as a strike.
    if (command !== PoolCommands.ERROR) this.strikes.delete(key);
    return { key, pool, message: decoded.message, encoding: decoded.encoding };
  }

  /**
   * A verb failed (the database is away, or a bug): the peer gets
   * internal_error, and a failure that repeats for every message is logged a
   * few times with a count.
   */
  failed(command: CommandName, identity: Buffer, e: unknown, requestId?: unknown): void {
    const { ctx } = this;
    const err = coerceError(e);
    const peer = identityKey(identity);
    ctx.limiter.write(
      `verb:${command}:${err.message}`,
      `for "failed to handle ${command}: ${err.message}"`,
      "error",
      { err, peer, command },
      `failed to handle ${command}: ${err.message}`,
      { lines: 1 },
    );
    ctx.send(
      identity,
      BrokerCommands.ERROR,
      faultToErrorBody(
        fault("internal_error", err.message, { command }),
        typeof requestId === "string" ? { request_id: requestId } : {},
      ),
      ctx.pools.get(peer)?.encoding,
    );
  }

  /**
   * A RESULT refused for some of its items: the valid ones go on, and each
   * invalid one is refused by its attempt_id (PROTOCOL.md, Errors), the whole
   * message counting as one strike. Undefined when the body cannot be judged
   * item by item.
   */
  private salvage(
    identity: Buffer,
    pool: PoolRecord | undefined,
    f: ProtocolFault,
    frames: Buffer[],
  ): { results: unknown[]; decoded: Decoded & { ok: true } } | undefined {
    if (f.command !== PoolCommands.RESULT || !f.instancePath?.startsWith("/results/")) return undefined;
    if (f.code !== "schema_violation" && f.code !== "too_deep") return undefined;
    const body = decodeBody(frames[3]!, PoolCommands.RESULT);
    const salvaged = body.ok ? salvageResults(body.value) : undefined;
    if (!body.ok || !salvaged) return undefined;
    const who = pool?.poolId ?? "peer " + JSON.stringify(identityKey(identity));
    for (const r of salvaged.refused) this.ctx.metrics.protocolFault(r.code);
    for (const r of salvaged.refused.slice(0, MAX_NAMED_REFUSALS)) {
      this.ctx.send(identity, BrokerCommands.ERROR, faultToErrorBody(r), pool?.encoding);
    }
    this.peerLine(
      identity,
      pool,
      f,
      {
        refused: salvaged.refused.length,
        accepted: salvaged.results.length,
        attempt_ids: salvaged.refused.slice(0, MAX_NAMED_REFUSALS).map((r) => r.attemptId),
      },
      `refused ${salvaged.refused.length} of the ${salvaged.refused.length + salvaged.results.length} results in a RESULT from ${who} (first: ${f.code} at ${f.instancePath}); the others go on`,
    );
    this.strike(identity, pool);
    return {
      results: salvaged.results,
      decoded: {
        ok: true,
        message: { command: "RESULT", body: { results: salvaged.results } },
        encoding: body.encoding,
      },
    };
  }

  forgive(key: string): void {
    this.strikes.delete(key);
  }

  /** One more bad message in a row from this peer; too many and it is dropped. */
  strike(identity: Buffer, pool: PoolRecord | undefined): void {
    const key = identityKey(identity);
    const strikes = (this.strikes.get(key) ?? 0) + 1;
    // Bounded memory: peers that sent one bad message under a fresh routing id each would pile up.
    if (strikes === 1 && this.strikes.size >= MAX_TRACKED_PEERS) {
      const oldest = this.strikes.keys().next();
      if (!oldest.done) this.strikes.delete(oldest.value);
    }
    this.strikes.set(key, strikes);
    if (strikes >= MAX_CONSECUTIVE_ERRORS) this.drop(identity, pool, "too_many_errors");
  }

  /** Forgets peers whose ignore period is over, budgets of peers gone quiet, and old log-limit keys. */
  sweep(now: number): void {
    this.ctx.limiter.sweep();
    for (const [key, until] of this.ignoredUntil) if (until < now) this.ignoredUntil.delete(key);
    this.budget.sweep(now);
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
    this.ctx.limiter.write(
      `peer:${key}`,
      `from ${who}`,
      "warn",
      { peer: key, pool_id: pool?.poolId, code: "over_budget" },
      `${who} is over its work budget (${this.budget.messagesPerSecond} messages or ${this.budget.bytesPerSecond} bytes per second): ` +
        "its messages are dropped unread; send fewer, larger batches",
    );
    this.ctx.metrics.protocolFault("over_budget");
    if (sustained) this.drop(identity, pool, "over_budget");
  }

  private reject(identity: Buffer, pool: PoolRecord | undefined, f: ProtocolFault, frames: Buffer[]): void {
    const key = identityKey(identity);
    const who = pool?.poolId ?? "peer " + JSON.stringify(key);
    // A client matches answers by request_id: echo it whenever the envelope gives it away.
    const requestId = requestIdOf(f, frames[3]);
    this.peerLine(
      identity,
      pool,
      f,
      {
        schema_path: f.schemaPath,
        instance_path: f.instancePath,
        frames: frames.length - 1,
        request_id: requestId,
        strikes: (this.strikes.get(key) ?? 0) + 1,
      },
      `rejected a message from ${who}: ${f.code}`,
    );
    this.ctx.metrics.protocolFault(f.code);
    // Never answer an ERROR with an ERROR: two confused peers would loop.
    if (f.command !== PoolCommands.ERROR) {
      this.ctx.send(
        identity,
        BrokerCommands.ERROR,
        faultToErrorBody(f, requestId ? { request_id: requestId } : {}),
        pool?.encoding,
      );
    }
    this.strike(identity, pool);
  }

  /** A line about one peer's refused message, rate-limited per peer like every line about it. */
  private peerLine(
    identity: Buffer,
    pool: PoolRecord | undefined,
    f: ProtocolFault,
    fields: Record<string, unknown>,
    msg: string,
  ): void {
    const key = identityKey(identity);
    const who = pool?.poolId ?? "peer " + JSON.stringify(key);
    this.ctx.limiter.write(
      `peer:${key}`,
      `from ${who}`,
      "warn",
      { peer: key, pool_id: pool?.poolId, code: f.code, command: f.command, ...fields },
      msg,
    );
  }

  /** ZeroMQ cannot close one peer of a ROUTER: drop its registration and ignore it for a while. */
  private drop(identity: Buffer, pool: PoolRecord | undefined, code: ErrorCode): void {
    const { ctx } = this;
    const key = identityKey(identity);
    const ignoreMs = ctx.opts.heartbeatMs * ctx.opts.heartbeatLiveness;
    ctx.send(
      identity,
      BrokerCommands.DISCONNECT,
      { code, reason: `dropped: ${code}` },
      pool?.encoding ?? "json",
    );
    this.strikes.delete(key);
    this.budget.forget(key);
    this.ignoredUntil.set(key, Date.now() + ignoreMs);
    if (pool) void this.purge(pool, code);
    const who = pool?.poolId ?? JSON.stringify(key);
    ctx.limiter.write(
      `drop:${key}`,
      `about dropping ${who}`,
      "warn",
      { peer: key, pool_id: pool?.poolId, code },
      `dropped peer ${who}: ${code}; its messages are ignored for ${ignoreMs} ms`,
    );
  }
}
