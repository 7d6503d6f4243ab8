/**
 * What the broker's services report as they work, for metrics. The broker
 * depends only on this interface (BrokerMetrics implements it with
 * prom-client), and reports to NO_METRICS until someone observes it
 * (Broker.observe), so a broker without an HTTP side pays nothing.
 */

/** How an attempt ended, as step_attempts.outcome says. */
export type AttemptOutcome = "complete" | "error" | "timeout" | "lost" | "undelivered" | "cancelled";

export interface MetricsSink {
  /** At send: `n` attempts of `handler` went to `pool`. */
  stepsDispatched(handler: string, pool: string, n?: number): void;
  /** An attempt ended; `durationMs` when it ran. */
  attemptFinished(handler: string, pool: string, outcome: AttemptOutcome, durationMs?: number): void;
  /** A step went back to ready for another attempt. */
  stepsRetried(handler: string, pool: string, n?: number): void;
  /** A group commit stored `size` results in `ms`. */
  commitBatch(size: number, ms: number): void;
  /** A claim of ready steps took `ms`. */
  claim(ms: number): void;
  /** Results received and not yet stored. */
  resultsAwaitingCommit(n: number): void;
  /** A message was refused with this protocol error code. */
  protocolFault(code: string): void;
  /** A statement failed for want of a working database connection. */
  dbError(): void;
}

const nothing = (): void => undefined;

export const NO_METRICS: MetricsSink = {
  stepsDispatched: nothing,
  attemptFinished: nothing,
  stepsRetried: nothing,
  commitBatch: nothing,
  claim: nothing,
  resultsAwaitingCommit: nothing,
  protocolFault: nothing,
  dbError: nothing,
};
