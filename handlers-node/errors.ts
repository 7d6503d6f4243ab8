/**
 * What a handler throws, and how a thrown value becomes the `error` of a
 * RESULT. Only `type`, `message`, `retryable`, `retry_after_ms` and `details`
 * cross the wire — never a stack trace.
 *
 * The receiving side matches on `type` (the error's `code`, else its `name`),
 * never on a prototype: prototypes do not cross process boundaries, and not
 * even two copies of this module in one process. So the mapping below reads
 * plain properties (`code`, `retryable`, `retryAfterMs`, `details`) and works
 * for any error object that carries them, not only for these classes.
 */
import {
  coerceError,
  MAX_VALUE_DEPTH,
  storableText,
  valueProblem,
  type StepError as WireStepError,
} from "../protocol";

export interface HandlerErrorOptions {
  /** Sent as the error's `type`; defaults to the class name. */
  code?: string;
  /** false fails the step now, whatever attempts are left. Default true. */
  retryable?: boolean;
  /** Wait at least this long before the next attempt (overrides the broker's backoff). */
  retryAfterMs?: number;
  /** A JSON object stored with the attempt (keep it small). */
  details?: Record<string, unknown>;
  cause?: unknown;
}

/** Base class of the errors a handler may throw to say how its step failed. */
export class HandlerError extends Error {
  readonly code: string | undefined;
  readonly retryable: boolean;
  readonly retryAfterMs: number | undefined;
  readonly details: Record<string, unknown> | undefined;

  constructor(message: string, opts: HandlerErrorOptions = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = new.target.name;
    this.code = opts.code;
    this.retryable = opts.retryable ?? true;
    this.retryAfterMs = opts.retryAfterMs;
    this.details = opts.details;
  }
}

/** Fails the step now: no further attempt, whatever `max_attempts` says. */
export class PermanentError extends HandlerError {
  constructor(message: string, opts: Omit<HandlerErrorOptions, "retryable" | "retryAfterMs"> = {}) {
    super(message, { ...opts, retryable: false });
  }
}

/** Fails this attempt; the step is retried (after `retryAfterMs` when given). */
export class RetryableError extends HandlerError {
  constructor(message: string, opts: Omit<HandlerErrorOptions, "retryable"> = {}) {
    super(message, { ...opts, retryable: true });
  }
}

/** `throw permanent("card declined")` */
export function permanent(
  message: string,
  opts?: Omit<HandlerErrorOptions, "retryable" | "retryAfterMs">,
): PermanentError {
  return new PermanentError(message, opts);
}

/** `throw retryAfter(30_000, "rate limited")` */
export function retryAfter(
  ms: number,
  message: string,
  opts?: Omit<HandlerErrorOptions, "retryable" | "retryAfterMs">,
): RetryableError {
  return new RetryableError(message, { ...opts, retryAfterMs: ms });
}

/**
 * Why the SDK aborted a step's signal. `signal.reason` is a `StepAbortedError`
 * whose `code` is one of these: the four CANCEL reasons of the protocol, plus
 * `not_adopted` (after a reconnect the broker no longer counts the attempt as
 * this pool's) and `pool_closing` (close() gave up waiting after `drainMs`).
 */
export type AbortCode =
  "task_cancelled" | "timeout" | "lease_lost" | "shutdown" | "not_adopted" | "pool_closing";

export class StepAbortedError extends Error {
  readonly code: AbortCode;
  constructor(code: AbortCode, message: string) {
    super(message);
    this.name = "AbortError";
    this.code = code;
  }
}

const TYPE_PATTERN_MAX = 128;
const MESSAGE_MAX = 8192;
const RETRY_AFTER_MAX = 86_400_000;

function isPlainObject(v: unknown): v is Record<string, unknown> {
  if (!v || typeof v !== "object" || Array.isArray(v)) return false;
  const proto: unknown = Object.getPrototypeOf(v);
  return proto === Object.prototype || proto === null;
}

/** Turns anything a handler threw into the wire's `error` object. */
export function toWireError(thrown: unknown): WireStepError {
  const err = coerceError(thrown);
  const props = err as unknown as Record<string, unknown>;
  const code = props.code;
  let type =
    (typeof code === "string" || typeof code === "number") && String(code) !== "" ? String(code) : err.name;
  if (!type) type = "Error";
  const out: WireStepError = {
    type: type.slice(0, TYPE_PATTERN_MAX),
    // A message is only reported, so an unstorable character in it must not cost the whole result.
    message: storableText(String(err.message ?? "").slice(0, MESSAGE_MAX)),
    retryable: props.retryable !== false,
  };
  const after = props.retryAfterMs;
  if (typeof after === "number" && Number.isFinite(after) && after >= 0) {
    out.retry_after_ms = Math.min(Math.round(after), RETRY_AFTER_MAX);
  }
  if (isPlainObject(props.details)) {
    try {
      const details = JSON.parse(JSON.stringify(props.details)) as Record<string, unknown>;
      // Details the broker would refuse are dropped like details JSON cannot carry: the error itself still arrives.
      if (!valueProblem(details, MAX_VALUE_DEPTH)) out.details = details;
    } catch {
      // details that do not serialize are dropped rather than failing the result
    }
  }
  return out;
}
