import type { Logger } from "pino";
import type { Encoding, TemplateRef } from "../protocol";

/**
 * One attempt of one step, as a handler sees it (the wire's `STEP.steps[i]`
 * in camelCase). The type parameters only describe what the handler expects;
 * nothing checks them at run time.
 */
export interface Step<
  TInputs = Record<string, unknown>,
  TContext = Record<string, unknown>,
  TConfig = Record<string, unknown>,
> {
  readonly taskId: string;
  readonly stepId: string;
  /** Names this attempt in every RESULT, PROGRESS and CANCEL. */
  readonly attemptId: string;
  /** The step's name in its template, e.g. `process_payment`. */
  readonly stepName: string;
  /** The handler name this step was dispatched to. */
  readonly handler: string;
  /** 1 for the first attempt. */
  readonly attempt: number;
  readonly maxAttempts: number;
  /** The lease: without a result or `ctx.progress()` within this time the attempt times out. */
  readonly timeoutMs: number;
  readonly template: TemplateRef;
  /** The task's context, as submitted. */
  readonly context: TContext;
  /** The step's handler config from the template. */
  readonly config: TConfig;
  /** Outputs of the step's dependencies by step name; `null` where one stored no output. */
  readonly inputs: TInputs;
  /**
   * The attempt's W3C trace context (PROTOCOL.md, Trace context): start the
   * handler's spans as children of `traceparent`. Undefined when the broker
   * sent none (an older broker).
   */
  readonly trace?: StepTrace;
}

/** One attempt's trace context: the task's trace id, a span id of the attempt's own. */
export interface StepTrace {
  /** `00-<traceId>-<spanId>-<flags>`, for a `traceparent` header or an OpenTelemetry propagator. */
  readonly traceparent: string;
  readonly tracestate?: string;
  readonly traceId: string;
  /** The attempt's span id (the parent of the handler's spans). */
  readonly spanId: string;
  /** True when the trace is sampled (flags bit 0). */
  readonly sampled: boolean;
}

/** What a handler gets besides its step. */
export interface StepContext {
  /**
   * Aborted when the broker sends CANCEL, when the lease passes without
   * progress, and when close() stops waiting for the step. `signal.reason` is
   * a `StepAbortedError` whose `code` says which. Pass it to fetch(), timers
   * and child processes; a handler that ignores it keeps its slot until it returns.
   */
  readonly signal: AbortSignal;
  /**
   * Tells the broker the step is still working (PROGRESS): extends its lease by
   * `timeoutMs` from now. `fraction` is 0..1; both are shown to operators.
   * Calls within one event-loop turn are coalesced into one message.
   */
  progress(fraction?: number, message?: string): void;
  /** A child logger carrying pool_id, task_id, step_id, attempt_id and step. */
  readonly log: Logger;
}

/**
 * Runs one step. Return its output (any JSON value; `undefined` becomes
 * `null`) or throw to fail the attempt (see `PermanentError`, `RetryableError`).
 */
export type Handler<
  TInputs = Record<string, unknown>,
  TContext = Record<string, unknown>,
  TConfig = Record<string, unknown>,
> = (step: Step<TInputs, TContext, TConfig>, ctx: StepContext) => unknown;

export interface CurveOptions {
  /** The broker's public key (Z85, 40 characters). */
  serverPublicKey: string;
  /** This pool's key pair (Z85), e.g. from zeromq's `curveKeyPair()`. */
  publicKey: string;
  secretKey: string;
}

export interface HandlerPoolOptions {
  /** The broker's endpoint, e.g. `tcp://broker.internal:5555`. Give this or `endpoints`. */
  endpoint?: string;
  /** Several brokers: one DEALER each (a DEALER on several endpoints would round-robin). */
  endpoints?: string[];
  /** Routing id and name in the broker's registry; default `${hostname}-${pid}-${random}`. */
  poolId?: string;
  /**
   * Most attempts this process runs at once (default 1), announced to every
   * broker as its credit. Steps a broker sends beyond it wait locally.
   */
  capacity?: number;
  /** Body encoding asked for in HELLO (default json); the broker confirms it in WELCOME. */
  encoding?: Encoding;
  /** Default: pino at level STEPBROKER_LOG_LEVEL, else "info". */
  logger?: Logger;
  /** Delay between reconnects: from `initialMs` (100) doubling to `maxMs` (5000). */
  reconnect?: { initialMs?: number; maxMs?: number };
  /**
   * Liveness used until a broker's WELCOME states its own (default 1000 ms × 3):
   * without WELCOME within `intervalMs × liveness` the pool says HELLO again on
   * a fresh socket.
   */
  heartbeat?: { intervalMs?: number; liveness?: number };
  /** CURVE encryption for brokers on other hosts. */
  curve?: CurveOptions;
  /** Free-form labels shown in the broker's pool list (HELLO `labels`). */
  labels?: Record<string, unknown>;
}

export interface StartOptions {
  /**
   * true (default): resolve once a broker has answered WELCOME. false: resolve
   * as soon as the sockets are connecting. Either way the pool keeps trying in
   * the background until close().
   */
  waitForWelcome?: boolean;
}

export interface CloseOptions {
  /** How long running steps may go on before they are aborted and handed back (default 5000). */
  drainMs?: number;
  /** How long to wait for ACKs of sent results before closing anyway (default heartbeat × liveness). */
  ackTimeoutMs?: number;
}
