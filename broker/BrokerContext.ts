/**
 * What the broker's services share: the options, the log, the state port, the
 * pool registry, and the few verbs every service needs (send, refuse, cancel,
 * hand attempts back, wake dispatch). Each service gets this one object
 * instead of a reference to the broker, so none can reach into another's state.
 */
import type { Logger } from "pino";
import {
  BrokerCommands,
  coerceError,
  encodeMessage,
  faultToErrorBody,
  type BodyOf,
  type CancelReason,
  type CommandName,
  type Encoding,
  type ProtocolFault,
} from "../protocol";
import type { ResolvedOptions } from "./config";
import { NO_METRICS, type MetricsSink } from "./metrics/MetricsSink";
import { NO_TRACES, type TraceSink } from "./metrics/TraceSink";
import type { LogLimiter } from "./LogLimiter";
import { identityKey, type PoolRecord, type PoolRegistry } from "./pools/PoolRegistry";
import type { StatePort } from "./StatePort";
import type { Outbox } from "./transport/Outbox";

export type BrokerState = "created" | "running" | "stopping" | "stopped";

export interface BrokerContext {
  readonly id: string;
  readonly opts: ResolvedOptions;
  readonly log: Logger;
  readonly state: StatePort;
  readonly pools: PoolRegistry;
  /** Lines about one peer, or one repeated failure, are rate-limited: a flood must not become a log flood. */
  readonly limiter: LogLimiter;
  readonly outbox: Outbox;
  /** Where the services report what they did (NO_METRICS until Broker.observe). */
  metrics: MetricsSink;
  /** Where each attempt goes as a span once its result is stored (NO_TRACES unless export is on). */
  traces: TraceSink;
  /** Serving: new claims and sends are allowed. */
  isRunning(): boolean;
  send<C extends CommandName>(identity: Buffer, command: C, body: BodyOf<C>, encoding?: Encoding): void;
  sendError(identity: Buffer, f: ProtocolFault, encoding?: Encoding): void;
  /** CANCELs for these attempts of the pool, in messages of at most max_batch. */
  sendCancel(pool: PoolRecord, attemptIds: string[], reason: CancelReason): void;
  /** Puts attempts back to ready (counting an attempt or not); a failure is logged, and the leases expire instead. */
  release(attemptIds: string[], countAttempt: boolean, reason: string): Promise<void>;
  /** Asks for a dispatch round (see Dispatcher.kick). */
  kick(creditOf?: PoolRecord, poll?: boolean): void;
  /** Asks for a dispatch round at this time (a retry's backoff ends). */
  kickAt(when: number): void;
}

export interface ContextParts {
  id: string;
  opts: ResolvedOptions;
  log: Logger;
  pools: PoolRegistry;
  limiter: LogLimiter;
  outbox: Outbox;
  lifecycle(): BrokerState;
  kick(creditOf?: PoolRecord, poll?: boolean): void;
  kickAt(when: number): void;
}

export function createContext(parts: ContextParts): BrokerContext {
  const { opts, log, pools, outbox } = parts;
  const state = opts.state;
  const send = <C extends CommandName>(
    identity: Buffer,
    command: C,
    body: BodyOf<C>,
    encoding: Encoding = "json",
  ): void => {
    const pool = pools.get(identityKey(identity));
    if (pool) pools.noteSent(pool, Date.now());
    outbox.send(identity, encodeMessage(command, body, encoding));
  };
  const ctx: BrokerContext = {
    id: parts.id,
    opts,
    log,
    state,
    pools,
    limiter: parts.limiter,
    outbox,
    metrics: NO_METRICS,
    traces: NO_TRACES,
    isRunning: () => parts.lifecycle() === "running",
    send,
    sendError: (identity, f, encoding = "json") => {
      ctx.metrics.protocolFault(f.code);
      send(identity, BrokerCommands.ERROR, faultToErrorBody(f), encoding);
    },
    sendCancel: (pool, attemptIds, reason) => {
      for (let i = 0; i < attemptIds.length; i += opts.maxBatch) {
        const cancels = attemptIds.slice(i, i + opts.maxBatch).map((attempt_id) => ({ attempt_id, reason }));
        send(pool.identity, BrokerCommands.CANCEL, { cancels }, pool.encoding);
      }
    },
    release: async (attemptIds, countAttempt, reason) => {
      try {
        await state.releaseAttempts(attemptIds, { countAttempt, reason });
      } catch (e) {
        // The leases will expire and the steps follow their retry policy: slower, not lost.
        const err = coerceError(e);
        parts.limiter.write(
          `release:${err.message}`,
          `for "could not release attempts"`,
          "error",
          { err, attempts: attemptIds.length, reason },
          `could not release attempts (${err.message}); their leases will expire instead`,
          { lines: 1 },
        );
      }
      parts.kick();
    },
    kick: (creditOf, poll) => parts.kick(creditOf, poll),
    kickAt: (when) => parts.kickAt(when),
  };
  return ctx;
}
