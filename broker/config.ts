/**
 * Broker options, their defaults, and the checks made before binding.
 */
import { hostname } from "node:os";
import type { Logger } from "pino";
import { HEARTBEAT_INTERVAL_MS, HEARTBEAT_LIVENESS, MAX_BATCH, MAX_MESSAGE_BYTES } from "../protocol";
import type { StatePort } from "./statePort";
import { PEER_BYTES_PER_SECOND, PEER_MESSAGES_PER_SECOND } from "./workBudget";

export interface CurveOptions {
  /** The broker's Z85 key pair (from zeromq's curveKeyPair()). */
  publicKey: string;
  secretKey: string;
  /** Z85 public keys of the pools and clients allowed in; empty or absent admits any key. */
  allowedClientKeys?: string[];
}

export interface BrokerOptions {
  /** Where to bind: inproc://, ipc:// or tcp:// endpoints. `tcp://127.0.0.1:*` picks a free port. */
  endpoints: string[];
  state: StatePort;
  /**
   * Names this broker's leases. Keep it stable across restarts (the default is
   * derived from the host and endpoints) so a restarted broker recognises the
   * leases of its previous life.
   */
  brokerId?: string;
  heartbeatMs?: number;
  heartbeatLiveness?: number;
  maxMessageBytes?: number;
  maxBatch?: number;
  /** Safety-net poll for work that no notification announced (ms). */
  pollMs?: number;
  /** How often leases are checked for expiry (ms). */
  leaseCheckMs?: number;
  /** After a start, how long pools have to reconnect and claim their attempts before the rest are made ready (ms). */
  recoveryGraceMs?: number;
  /** Most results in one group commit. */
  commitBatch?: number;
  /**
   * The work budget of one peer: bytes of frames and messages per second the
   * broker decodes from it (defaults 64 MiB and 20,000); beyond, its messages
   * are dropped undecoded, and after 3 s in a row of that the peer is dropped.
   */
  peerBytesPerSecond?: number;
  peerMessagesPerSecond?: number;
  /** Bind TCP on a non-loopback address without CURVE. */
  allowInsecure?: boolean;
  curve?: CurveOptions;
  logger?: Logger;
}

export type ResolvedOptions = Required<Omit<BrokerOptions, "curve" | "logger" | "state">> &
  Pick<BrokerOptions, "curve" | "state"> & { logger: Logger };

export function defaultBrokerId(endpoints: string[]): string {
  const ep = endpoints.join(",").replace(/[^A-Za-z0-9_.:-]+/g, "_");
  return `${hostname()}:${ep}`.slice(0, 128);
}

export function resolveOptions(o: BrokerOptions, logger: Logger): ResolvedOptions {
  const heartbeatMs = o.heartbeatMs ?? HEARTBEAT_INTERVAL_MS;
  const heartbeatLiveness = o.heartbeatLiveness ?? HEARTBEAT_LIVENESS;
  return {
    endpoints: o.endpoints,
    state: o.state,
    brokerId: o.brokerId ?? defaultBrokerId(o.endpoints),
    heartbeatMs,
    heartbeatLiveness,
    maxMessageBytes: o.maxMessageBytes ?? MAX_MESSAGE_BYTES,
    maxBatch: o.maxBatch ?? MAX_BATCH,
    pollMs: o.pollMs ?? 1000,
    leaseCheckMs: o.leaseCheckMs ?? 500,
    recoveryGraceMs: o.recoveryGraceMs ?? heartbeatMs * heartbeatLiveness * 2,
    commitBatch: o.commitBatch ?? 2048,
    peerBytesPerSecond: o.peerBytesPerSecond ?? PEER_BYTES_PER_SECOND,
    peerMessagesPerSecond: o.peerMessagesPerSecond ?? PEER_MESSAGES_PER_SECOND,
    allowInsecure: o.allowInsecure ?? false,
    curve: o.curve,
    logger,
  };
}

const LOOPBACK = /^(127\.\d+\.\d+\.\d+|localhost|\[::1\]|::1)$/;

/** The host part of a tcp:// endpoint, or undefined for other transports. */
export function tcpHost(endpoint: string): string | undefined {
  const m = /^tcp:\/\/(.+):([0-9]+|\*)$/.exec(endpoint);
  return m ? m[1] : undefined;
}

/**
 * Refuses to bind TCP beyond loopback without encryption: a pool's steps carry
 * the task's context, which is often private.
 */
export function checkEndpoints(o: ResolvedOptions): void {
  if (o.endpoints.length === 0)
    throw new Error("no endpoint to bind: give at least one (e.g. tcp://127.0.0.1:5555)");
  for (const ep of o.endpoints) {
    if (!/^(tcp|ipc|inproc):\/\/.+/.test(ep)) {
      throw new Error(`endpoint ${JSON.stringify(ep)} is not tcp://, ipc:// or inproc://`);
    }
    const host = tcpHost(ep);
    if (host !== undefined && !LOOPBACK.test(host) && !o.curve && !o.allowInsecure) {
      throw new Error(
        `refusing to bind ${ep} beyond loopback without CURVE: configure CURVE keys, or pass allowInsecure (--insecure) if the network is trusted`,
      );
    }
  }
}
