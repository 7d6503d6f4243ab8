/**
 * Broker options, their defaults, and the checks made before binding.
 */
import { hostname } from "node:os";
import type { Logger } from "pino";
import { HEARTBEAT_INTERVAL_MS, HEARTBEAT_LIVENESS, MAX_BATCH, MAX_MESSAGE_BYTES } from "../protocol";
import type { TraceSink } from "./metrics/TraceSink";
import { Roles, type Role } from "./roles";
import type { StatePort } from "./StatePort";
import { PEER_BYTES_PER_SECOND, PEER_MESSAGES_PER_SECOND } from "./transport/WorkBudget";

export interface CurveOptions {
  /** The broker's Z85 key pair (from `stepbroker keygen` or zeromq's curveKeyPair()). */
  publicKey: string;
  secretKey: string;
  /** Z85 public keys admitted to `endpoints` (pools; every role when no other socket is bound). */
  poolKeys?: string[];
  /** Keys admitted to `clientEndpoints`. */
  clientKeys?: string[];
  /** Keys admitted to `adminEndpoints`. */
  adminKeys?: string[];
  /** Admit any CURVE key (encryption without authentication). An empty allow-list is refused without it. */
  allowAnyKey?: boolean;
}

/** One ROUTER the broker binds: its endpoints, the roles its peers have, and its ZAP domain. */
export interface ListenerPlan {
  /** Names the socket in logs and is its ZAP domain: "pool", "client" or "admin". */
  name: Role;
  endpoints: string[];
  roles: ReadonlySet<Role>;
  /** Its allow-list, with CURVE. */
  keys: string[];
}

export interface BrokerOptions {
  /**
   * Where to bind: inproc://, ipc:// or tcp:// endpoints. `tcp://127.0.0.1:*` picks a free port.
   * Pools connect here; so does every role that has no socket of its own.
   */
  endpoints: string[];
  /** A socket for clients (SUBMIT, STATUS, WAIT, CANCEL_TASK, POOLS, HISTORY); without it clients use `endpoints`. */
  clientEndpoints?: string[];
  /** A socket for admin clients (client commands, and POOLS with pool ids); without it admins use the client socket. */
  adminEndpoints?: string[];
  /** Refuse to bind any endpoint, loopback and ipc:// included, without CURVE. */
  requireCurve?: boolean;
  /** At most one log line per refused peer address (or listener and reason) per this many ms. */
  refusalLogIntervalMs?: number;
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
  /** How often the history tables' partitions are created ahead (and, with historyRetentionDays, pruned) (ms, default 1 h). */
  partitionCheckMs?: number;
  /** Days ahead of today whose history partitions exist (default 3): a broker may be down that long without rows in the default partition. */
  historyDaysAhead?: number;
  /** Drop history (and finished tasks) older than this many days on the partition check; 0, the default: keep everything. */
  historyRetentionDays?: number;
  /** Most results in one group commit. */
  commitBatch?: number;
  /**
   * Results waiting for the group commit beyond which each new result's
   * credit is held until it is stored, so pools get no new work while the
   * database lags (default four batches).
   */
  maxPendingResults?: number;
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
  /** Where attempt spans go; default: OpenTelemetry export when OTEL_EXPORTER_OTLP_ENDPOINT is set, else nowhere. */
  traces?: TraceSink;
}

export type ResolvedOptions = Required<
  Omit<BrokerOptions, "curve" | "logger" | "state" | "clientEndpoints" | "adminEndpoints" | "traces">
> &
  Pick<BrokerOptions, "curve" | "state"> & { logger: Logger; listeners: ListenerPlan[] };

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
    partitionCheckMs: wholeNumber("partitionCheckMs", o.partitionCheckMs ?? 3_600_000, 1, 2 ** 31 - 1),
    historyDaysAhead: wholeNumber("historyDaysAhead", o.historyDaysAhead ?? 3, 0, 366),
    historyRetentionDays: wholeNumber("historyRetentionDays", o.historyRetentionDays ?? 0, 0, 36_500),
    commitBatch: o.commitBatch ?? 2048,
    maxPendingResults: o.maxPendingResults ?? (o.commitBatch ?? 2048) * 4,
    peerBytesPerSecond: o.peerBytesPerSecond ?? PEER_BYTES_PER_SECOND,
    peerMessagesPerSecond: o.peerMessagesPerSecond ?? PEER_MESSAGES_PER_SECOND,
    allowInsecure: o.allowInsecure ?? false,
    requireCurve: o.requireCurve ?? false,
    refusalLogIntervalMs: o.refusalLogIntervalMs ?? 60_000,
    curve: o.curve,
    logger,
    listeners: planListeners(o),
  };
}

/** `value` when it is a whole number in [min, max]; a timer or a partition count beyond it is a typo. */
function wholeNumber(name: string, value: number, min: number, max: number): number {
  if (!Number.isInteger(value) || value < min || value > max)
    throw new Error(`${name} must be a whole number from ${min} to ${max}, not ${value}`);
  return value;
}

/**
 * The sockets to bind. Each role without a socket of its own is served by
 * the next one down: admin by the client socket, client by the pool socket.
 * So a broker given only `endpoints` serves every role on one socket (the
 * loopback default), and over CURVE each key's role is fixed by the socket,
 * hence the allow-list, it is admitted to.
 */
export function planListeners(o: BrokerOptions): ListenerPlan[] {
  const client = o.clientEndpoints ?? [];
  const admin = o.adminEndpoints ?? [];
  const c = o.curve;
  const plans: ListenerPlan[] = [
    {
      name: Roles.POOL,
      endpoints: o.endpoints,
      roles: new Set<Role>([
        Roles.POOL,
        ...(client.length === 0 ? [Roles.CLIENT] : []),
        ...(client.length === 0 && admin.length === 0 ? [Roles.ADMIN] : []),
      ]),
      keys: c?.poolKeys ?? [],
    },
  ];
  if (client.length > 0)
    plans.push({
      name: Roles.CLIENT,
      endpoints: client,
      roles: new Set<Role>([Roles.CLIENT, ...(admin.length === 0 ? [Roles.ADMIN] : [])]),
      keys: c?.clientKeys ?? [],
    });
  if (admin.length > 0)
    plans.push({
      name: Roles.ADMIN,
      endpoints: admin,
      roles: new Set<Role>([Roles.ADMIN]),
      keys: c?.adminKeys ?? [],
    });
  return plans;
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
  if (o.requireCurve && !o.curve)
    throw new Error(
      "CURVE is required (--require-curve) but no key pair is configured: give --curve-secret-key-file FILE (made by stepbroker keygen)",
    );
  checkAllowLists(o);
  for (const ep of o.listeners.flatMap((l) => l.endpoints)) {
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

/**
 * Over CURVE, a key list must name the socket it is for (a socket, not a
 * message, decides a key's role), and an empty list is refused: libzmq would
 * admit every key that knows the broker's public key.
 */
function checkAllowLists(o: ResolvedOptions): void {
  const c = o.curve;
  if (!c) return;
  const names = new Set(o.listeners.map((l) => l.name));
  for (const [role, keys, flag] of [
    [Roles.CLIENT, c.clientKeys, "client"],
    [Roles.ADMIN, c.adminKeys, "admin"],
  ] as const) {
    if (keys !== undefined && keys.length > 0 && !names.has(role))
      throw new Error(
        `--${flag}-keys needs --${flag}-endpoint: over CURVE the socket a key is admitted to decides its role`,
      );
  }
  if (c.allowAnyKey) return;
  for (const l of o.listeners) {
    if (l.keys.length === 0)
      throw new Error(
        `the allow-list of the ${l.name} socket (${l.endpoints.join(", ")}) is empty: give --${l.name}-keys FILE with at least one public key, or --allow-any-key to admit any CURVE key`,
      );
  }
}

/**
 * The checks a Broker makes when constructed, without a database: the CLI
 * runs them before it opens (maybe starts) PostgreSQL, so a bad option fails
 * in a moment. None of them reads `state`.
 */
export function checkBrokerOptions(o: Omit<BrokerOptions, "state">, logger: Logger): void {
  checkEndpoints(resolveOptions({ ...o, state: undefined as unknown as StatePort }, logger));
}
