/**
 * OpenTelemetry export of attempt spans over OTLP/HTTP (JSON), on when
 * OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT) is set. The exporter
 * reads the standard OTEL_EXPORTER_OTLP_* variables itself (endpoint, headers,
 * timeout); the service is "stepbroker" unless OTEL_SERVICE_NAME says otherwise.
 *
 * The OpenTelemetry packages are loaded only when export is on: they cost
 * ~0.4 s of start-up, which a broker that does not export should not pay.
 */
import type { Tracer } from "@opentelemetry/api";
import type { BasicTracerProvider } from "@opentelemetry/sdk-trace-base";
import type { Logger } from "pino";
import { attemptSpanId, coerceError, taskTrace } from "../../protocol";
import { NO_TRACES, type AttemptSpan, type TraceSink } from "./TraceSink";

/** Spans held while the packages load; past this many, new ones are dropped (and counted in the log). */
const MAX_QUEUED = 10_000;

export class TraceExporter implements TraceSink {
  private tracer: Tracer | undefined;
  private provider: BasicTracerProvider | undefined;
  private api: typeof import("@opentelemetry/api") | undefined;
  private queued: AttemptSpan[] = [];
  private dropped = 0;
  private readonly loading: Promise<void>;
  /**
   * The ids the next span gets. OpenTelemetry's API lets no caller choose a
   * span's ids, but the provider takes an IdGenerator: startSpan() asks it
   * synchronously, so setting these just before is enough.
   */
  private next = { traceId: "", spanId: "" };

  /** `url` overrides the variables' endpoint (a full .../v1/traces URL); `delayMs` is the batch delay (5 s by default). */
  constructor(
    private readonly log: Logger,
    private readonly options: { url?: string; delayMs?: number } = {},
  ) {
    this.loading = this.load().catch((e: unknown) => {
      this.queued = [];
      this.log.error(
        { err: coerceError(e) },
        "could not start the OpenTelemetry exporter; no spans are exported. Check the OTEL_EXPORTER_OTLP_* variables",
      );
    });
  }

  private async load(): Promise<void> {
    const [api, base, otlp, resources] = await Promise.all([
      import("@opentelemetry/api"),
      import("@opentelemetry/sdk-trace-base"),
      import("@opentelemetry/exporter-trace-otlp-http"),
      import("@opentelemetry/resources"),
    ]);
    this.api = api;
    this.provider = new base.BasicTracerProvider({
      resource: resources.resourceFromAttributes({
        "service.name": process.env["OTEL_SERVICE_NAME"] ?? "stepbroker",
      }),
      idGenerator: {
        generateTraceId: () => this.next.traceId,
        generateSpanId: () => this.next.spanId,
      },
      spanProcessors: [
        new base.BatchSpanProcessor(
          new otlp.OTLPTraceExporter(this.options.url === undefined ? {} : { url: this.options.url }),
          this.options.delayMs === undefined ? {} : { scheduledDelayMillis: this.options.delayMs },
        ),
      ],
    });
    this.tracer = this.provider.getTracer("stepbroker");
    const queued = this.queued;
    this.queued = [];
    for (const s of queued) this.attemptEnded(s);
    this.log.info("exporting attempt spans with OpenTelemetry (OTLP/HTTP)");
  }

  attemptEnded(span: AttemptSpan): void {
    const { tracer, api } = this;
    if (!tracer || !api) {
      if (this.queued.length < MAX_QUEUED) this.queued.push(span);
      else this.dropped++;
      return;
    }
    const trace = taskTrace(span.taskId, span.taskTraceparent);
    this.next = { traceId: trace.traceId, spanId: attemptSpanId(span.attemptId) };
    // The parent as a remote span context: the SUBMIT's traceparent named it, and its flags decide sampling.
    const parent =
      trace.parentSpanId === undefined
        ? api.ROOT_CONTEXT
        : api.trace.setSpanContext(api.ROOT_CONTEXT, {
            traceId: trace.traceId,
            spanId: trace.parentSpanId,
            traceFlags: parseInt(trace.flags, 16) & 1,
            isRemote: true,
          });
    const s = tracer.startSpan(
      span.name,
      {
        kind: api.SpanKind.INTERNAL,
        startTime: span.startMs,
        attributes: {
          task_id: span.taskId,
          step_id: span.stepId,
          attempt_id: span.attemptId,
          handler: span.handler,
          pool_id: span.poolId,
          outcome: span.outcome,
        },
      },
      parent,
    );
    if (span.outcome === "error") s.setStatus({ code: api.SpanStatusCode.ERROR });
    s.end(Math.max(span.endMs, span.startMs));
  }

  async shutdown(): Promise<void> {
    await this.loading;
    if (this.dropped > 0)
      this.log.warn(
        { dropped: this.dropped },
        `dropped ${this.dropped} spans that came before the exporter started`,
      );
    await this.provider?.shutdown();
  }
}

/** A TraceExporter when the standard variables ask for export, NO_TRACES otherwise. */
export function traceSinkFromEnv(log: Logger, env: NodeJS.ProcessEnv = process.env): TraceSink {
  const on = Boolean(env["OTEL_EXPORTER_OTLP_ENDPOINT"] || env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]);
  return on && env["OTEL_TRACES_EXPORTER"] !== "none" ? new TraceExporter(log) : NO_TRACES;
}
