/**
 * Where the broker reports each attempt as a span (PROTOCOL.md, Trace
 * context). The broker depends only on this interface; TraceExporter
 * implements it with OpenTelemetry when OTEL_EXPORTER_OTLP_ENDPOINT is set,
 * and NO_TRACES is the default: a broker that does not export builds no span
 * per stored result (BatchCommit checks for NO_TRACES first).
 */
/** One attempt from dispatch to its result stored. */
export interface AttemptSpan {
  /**
   * The task's traceparent as submitted (null: none). The sink derives the
   * trace and the attempt's span id from it (taskTrace, attemptSpanId), so a
   * broker that does not export never hashes an attempt id for it.
   */
  taskTraceparent: string | null;
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
