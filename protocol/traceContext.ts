/**
 * W3C Trace Context for tasks and attempts (PROTOCOL.md, Trace context): a
 * task is one trace, each attempt a span of it whose id anyone holding the
 * attempt id can compute, so the broker, its exporter and every SDK agree
 * without storing a span id per attempt.
 */
import { hash } from "node:crypto";

/** The SUBMIT pattern (common.json `traceparent`): version 00, lowercase, neither id all zeros. */
export const TRACEPARENT = /^00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$/;

/** A traceparent taken apart. */
export interface TraceParts {
  traceId: string;
  /** The span the traceparent names (for an attempt's: the attempt's own span). */
  spanId: string;
  flags: string;
}

/** The attempt's trace context as STEP carries it (step.json `trace`). */
export interface AttemptTrace {
  traceparent: string;
  tracestate?: string;
}

/** The parts of a valid traceparent; null for anything else (an SDK reading a STEP from an unknown broker). */
export function traceContext(traceparent: unknown): TraceParts | null {
  if (typeof traceparent !== "string" || !TRACEPARENT.test(traceparent)) return null;
  return {
    traceId: traceparent.slice(3, 35),
    spanId: traceparent.slice(36, 52),
    flags: traceparent.slice(53),
  };
}

/** The attempt's span id: the first 8 bytes of SHA-256 of its id as hex, the next 8 should those be all zero. */
export function attemptSpanId(attemptId: string): string {
  // one-shot: a Hash object per attempt cost the broker several µs per step
  const hex = hash("sha256", attemptId, "hex");
  const first = hex.substring(0, 16);
  return first === ZERO_SPAN_ID ? hex.substring(16, 32) : first;
}

const ZERO_SPAN_ID = "0000000000000000";

/**
 * A UUID's 32 hex digits, lowercase: substrings around the four hyphens of
 * the canonical form (what PostgreSQL's uuid type prints), which costs a
 * fraction of replaceAll; any other form takes the general path.
 */
function uuidHex(id: string): string {
  const lower = id.toLowerCase();
  if (lower.length !== 36 || lower[8] !== "-" || lower[13] !== "-" || lower[18] !== "-" || lower[23] !== "-")
    return lower.replaceAll("-", "");
  return (
    lower.substring(0, 8) +
    lower.substring(9, 13) +
    lower.substring(14, 18) +
    lower.substring(19, 23) +
    lower.substring(24)
  );
}

/** A task's trace: its id and flags, and the span its attempts are children of (none for a trace of its own). */
export interface TaskTrace {
  traceId: string;
  flags: string;
  parentSpanId?: string;
}

/**
 * The task's trace from the traceparent it was submitted with; without one, a
 * trace id that is the task id's hex, and no parent span.
 */
export function taskTrace(taskId: string, traceparent: string | null): TaskTrace {
  const given = traceContext(traceparent);
  if (given) return { traceId: given.traceId, flags: given.flags, parentSpanId: given.spanId };
  return { traceId: uuidHex(taskId), flags: "01" };
}

/** The `trace` of one attempt's STEP item. */
export function attemptTrace(
  taskId: string,
  attemptId: string,
  traceparent: string | null,
  tracestate: string | null,
): AttemptTrace {
  const task = taskTrace(taskId, traceparent);
  const out: AttemptTrace = { traceparent: `00-${task.traceId}-${attemptSpanId(attemptId)}-${task.flags}` };
  if (tracestate !== null && traceparent !== null) out.tracestate = tracestate;
  return out;
}
