/**
 * The broker's ROUTER sockets, one per role group (config.ts planListeners),
 * with their options, their binding, the CURVE handshake watch and the ZAP
 * handler. It also answers, for a peer identity, which socket it came in on
 * and so which roles it has.
 */
import type { Logger } from "pino";
import { Router } from "zeromq";
import { coerceError, HARD_LIMIT_FACTOR, PROTOCOL_VERSION } from "../../protocol";
import type { ListenerPlan, ResolvedOptions } from "../config";
import type { LogLimiter } from "../LogLimiter";
import type { Role } from "../roles";
import { Outbox } from "./Outbox";
import { PeerIdentities } from "./PeerIdentities";
import { RefusalLog } from "./RefusalLog";
import { startZapHandler, type ZapDomain, type ZapHandler } from "./ZapHandler";

export class Listeners {
  /** One per entry of opts.listeners, in the same order: a peer's identity starts with its index. */
  readonly sockets: Router[];
  readonly identities: PeerIdentities;
  private zap: ZapHandler | undefined;
  private readonly bound: { socket: Router; endpoint: string }[] = [];
  private watching = false;

  /** Refused handshakes and keys: at most one line per peer address (or socket and reason) per interval. */
  private readonly refusals: RefusalLog;

  constructor(
    private readonly opts: ResolvedOptions,
    private readonly log: Logger,
  ) {
    this.refusals = new RefusalLog(log, opts.refusalLogIntervalMs);
    this.sockets = opts.listeners.map((plan) => this.newRouter(plan));
    this.identities = new PeerIdentities(this.sockets.length);
  }

  /** The endpoints actually bound (with `*` ports resolved), socket by socket: pool, then client, then admin. */
  get endpoints(): string[] {
    return this.bound.map((b) => b.endpoint);
  }

  /** The outbox that sends on these sockets; failed sends are logged through `limiter`. */
  newOutbox(onUnreachable: (identity: Buffer, frames: Buffer[]) => void, limiter: LogLimiter): Outbox {
    return new Outbox(this.sockets, this.identities, {
      onUnreachable,
      onError: (identity, err) => {
        const peer = identity.toString("latin1");
        limiter.write(
          `send:${peer}`,
          `about failed sends to ${JSON.stringify(peer)}`,
          "error",
          { err, peer },
          `send failed; the message was dropped: ${err.message}`,
        );
      },
    });
  }

  /**
   * Replaces the allow-list of one socket ("pool", "client" or "admin") while
   * running, as the CLI does on SIGHUP; connections already admitted stay.
   */
  setAllowedKeys(name: Role, keys: string[]): { added: string[]; removed: string[] } {
    const curve = this.opts.curve;
    const zap = this.zap;
    if (!curve || !zap) throw new Error("this broker does not use CURVE: there is no allow-list to set");
    if (!this.opts.listeners.some((l) => l.name === name))
      throw new Error(`this broker has no ${name} socket`);
    if (keys.length === 0 && !curve.allowAnyKey)
      throw new Error(
        `refusing an empty ${name} allow-list: it would lock every ${name} out; the old list stays`,
      );
    const diff = zap.setKeys(name, keys);
    this.log.info(
      { zap_domain: name, added: diff.added, removed: diff.removed, keys: keys.length },
      `${name} allow-list now has ${keys.length} keys (${diff.added.length} added, ${diff.removed.length} removed)`,
    );
    return diff;
  }

  /** Starts the ZAP handler (with CURVE) and binds every endpoint; on failure closes all and throws. */
  async bind(): Promise<void> {
    const curve = this.opts.curve;
    if (curve) {
      const domains = new Map<string, ZapDomain>(
        this.opts.listeners.map((l) => [l.name, { keys: l.keys, anyKey: curve.allowAnyKey ?? false }]),
      );
      this.zap = await startZapHandler(domains, this.log, this.refusals);
      this.watching = true;
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
          await this.close();
          throw new Error(`cannot bind ${ep}: ${hint}`, { cause: e });
        }
        this.bound.push({ socket, endpoint: socket.lastEndpoint ?? ep });
      }
    }
  }

  /** The sockets as the start log line describes them. */
  describe(): Record<string, unknown> {
    return {
      endpoints: this.endpoints,
      protocol: PROTOCOL_VERSION,
      sockets: this.opts.listeners.map((l) => ({
        name: l.name,
        endpoints: l.endpoints,
        roles: [...l.roles],
      })),
      curve: this.opts.curve !== undefined,
    };
  }

  /** Unbinds and closes every socket and the ZAP handler. */
  async close(): Promise<void> {
    this.watching = false;
    // close() frees an endpoint only once libzmq's reaper thread gets to the socket, which on a busy
    // machine can be after stop() returned; an unbind frees it before, so a new broker can bind it at once.
    await Promise.all(this.bound.map((b) => b.socket.unbind(b.endpoint).catch(() => undefined)));
    for (const s of this.sockets) s.close();
    await this.zap?.close();
  }

  listenerOf(identity: Buffer): ListenerPlan {
    return this.opts.listeners[this.identities.socketOf(identity)] ?? this.opts.listeners[0]!;
  }

  rolesOf(identity: Buffer): ReadonlySet<Role> {
    return this.listenerOf(identity).roles;
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
      // Connections the kernel holds for accept, past libzmq's default of 100: when many pools
      // (re)connect at once, say after a broker restart, the kernel drops the handshakes past the
      // backlog and each waits for a TCP retransmit, a second or more. Capped by net.core.somaxconn.
      backlog: 1024,
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
      if (this.watching) this.log.warn({ err: coerceError(e) }, "stopped watching handshakes");
    }
  }
}
