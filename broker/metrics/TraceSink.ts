/**
 * Where the broker reports each attempt as a span (PROTOCOL.md, Trace
 * context). The broker depends only on this interface; TraceExporter
 * implements it with OpenTelemetry when OTEL_EXPORTER_OTLP_ENDPOINT is set,
 * and NO_TRACES is the default, so a broker that does not export pays for one
 * no-op call per stored result.
 */
import type { TaskTrace } from "../../protocol/traceContext";

/** One attempt from dispatch to its result stored. */
export interface AttemptSpan {
  /** The task's trace, and the span its attempts are children of (none for a trace of its own). */
  trace: TaskTrace;
  /** The attempt's span id (attemptSpanId of its id). */
  spanId: string;
  /** The step's name. */
  name: string;
  startMs: number;
  endMs: number;
  taskId: string;
  stepId: string;
  attemptId: string;
  handler: string;
  poolId: string;
  outcome: "complete" | "error";
}

export interface TraceSink {
  attemptEnded(span: AttemptSpan): void;
  /** Sends what is buffered, then stops (at broker stop). */
  shutdown(): Promise<void>;
}

export const NO_TRACES: TraceSink = {
  attemptEnded: () => undefined,
  shutdown: () => Promise.resolve(),
};
