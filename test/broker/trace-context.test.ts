/**
 * W3C trace context from SUBMIT to the handlers and out as OpenTelemetry
 * spans (PROTOCOL.md, Trace context), on a real broker and PostgreSQL: a Node
 * pool in-process sees the submitted trace id and a span id per attempt; a
 * task submitted without one gets a trace of its own; a malformed traceparent
 * is a schema_violation naming the field; a pool that did not ask for trace
 * context (an older SDK) gets STEP items without it and still completes; and
 * the attempts arrive as spans at a real OTLP/HTTP receiver (a node:http
 * server taking the exporter's JSON).
 */
import { strict as assert } from "node:assert";
import { once } from "node:events";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { TraceExporter, traceSinkFromEnv } from "../../broker/metrics/TraceExporter";
import { NO_TRACES, type TraceSink } from "../../broker/metrics/TraceSink";
import { HandlerPool, RetryableError, type StepTrace } from "../../handlers-node";
import { BrokerError, StepbrokerClient } from "../../handlers-node/client";
import { attemptSpanId } from "../../protocol";
import { RawPeer } from "../support/rawPeer";
import { eventually, silent, useBrokerStack } from "../support/stack";

const TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN = "00f067aa0ba902b7";
const TRACEPARENT = `00-${TRACE_ID}-${CALLER_SPAN}-01`;
const TRACESTATE = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE";

/** first fails once (so it has two attempts), then second. */
const CHAIN = {
  namespace: "tr",
  name: "chain",
  version: "1",
  steps: [
    {
      name: "first",
      handler: "tr_flaky",
      retry: { max_attempts: 3, backoff: { initial_ms: 10, jitter: 0 } },
    },
    { name: "second", handler: "tr_seen", depends_on: ["first"] },
  ],
};
const OLD = { namespace: "tr", name: "old", version: "1", steps: [{ name: "only", handler: "tr_old" }] };

interface OtlpSpan {
  traceId: string;
  spanId: string;
  parentSpanId?: string;
  name: string;
  startTimeUnixNano: string;
  endTimeUnixNano: string;
  attributes: { key: string; value: { stringValue?: string } }[];
}

/** A minimal OTLP/HTTP receiver: every span POSTed to /v1/traces (JSON encoding), kept in order. */
class OtlpReceiver {
  readonly spans: OtlpSpan[] = [];
  readonly contentTypes: string[] = [];
  private server: Server | undefined;
  url = "";

  async start(): Promise<void> {
    this.server = createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on("data", (c: Buffer) => chunks.push(c));
      req.on("end", () => {
        if (req.method !== "POST" || req.url !== "/v1/traces") {
          res.writeHead(404).end();
          return;
        }
        this.contentTypes.push(String(req.headers["content-type"]));
        const body = JSON.parse(Buffer.concat(chunks).toString("utf8")) as {
          resourceSpans: { scopeSpans: { spans: OtlpSpan[] }[] }[];
        };
        for (const rs of body.resourceSpans) for (const ss of rs.scopeSpans) this.spans.push(...ss.spans);
        res.writeHead(200, { "content-type": "application/json" }).end("{}");
      });
    });
    this.server.listen(0, "127.0.0.1");
    await once(this.server, "listening");
    this.url = `http://127.0.0.1:${(this.server.address() as AddressInfo).port}/v1/traces`;
  }

  async stop(): Promise<void> {
    if (!this.server) return;
    this.server.closeAllConnections();
    await new Promise<void>((r) => this.server!.close(() => r()));
  }
}

function attr(span: OtlpSpan, key: string): string | undefined {
  return span.attributes.find((a) => a.key === key)?.value.stringValue;
}

describe("trace context from SUBMIT to handlers and OpenTelemetry", function () {
  this.timeout(60_000);
  const receiver = new OtlpReceiver();
  let exporter: TraceExporter | undefined;
  // The stack's broker is made at describe time; the exporter once the receiver has a port.
  const traces: TraceSink = {
    attemptEnded: (s) => exporter?.attemptEnded(s),
    shutdown: () => exporter?.shutdown() ?? Promise.resolve(),
  };
  before(async () => {
    await receiver.start();
    exporter = new TraceExporter(silent, { url: receiver.url, delayMs: 50 });
  });
  const stack = useBrokerStack("trace", "tcp", { traces });
  const seen: { attemptId: string; stepName: string; trace: StepTrace | undefined }[] = [];
  let pool: HandlerPool;
  let client: StepbrokerClient;

  before(async function () {
    this.timeout(30_000);
    await stack.registerTemplate(CHAIN);
    await stack.registerTemplate(OLD);
    pool = new HandlerPool({ endpoint: stack.endpoint, capacity: 4, logger: silent });
    const failed = new Set<string>();
    pool.handle("tr_flaky", (step) => {
      seen.push({ attemptId: step.attemptId, stepName: step.stepName, trace: step.trace });
      if (!failed.has(step.stepId)) {
        failed.add(step.stepId);
        throw new RetryableError("fails once");
      }
      return { ok: true };
    });
    pool.handle("tr_seen", (step) => {
      seen.push({ attemptId: step.attemptId, stepName: step.stepName, trace: step.trace });
      return { trace: step.trace ?? null };
    });
    await pool.start();
    client = new StepbrokerClient({ endpoint: stack.endpoint, requestTimeoutMs: 10_000 });
  });

  after(async () => {
    client?.close();
    await pool?.close({ drainMs: 2000 }).catch(() => undefined);
    await exporter?.shutdown().catch(() => undefined);
    await receiver.stop();
  });

  it("gives every attempt the submitted trace id, a span of its own and the tracestate", async () => {
    const { task } = await client.submit(
      { namespace: "tr", name: "chain" },
      {},
      { traceparent: TRACEPARENT, tracestate: TRACESTATE },
    );
    const done = await stack.waitForTask(task.task_id);
    assert.equal(done.state, "complete");
    const attempts = await stack.sql<{ attempt_id: string; step_name: string }>(
      `select a.attempt_id::text, s.name as step_name from step_attempts a join steps s on s.id = a.step_id
       where a.task_id = $1 order by a.started_at, a.attempt`,
      [task.task_id],
    );
    assert.equal(attempts.length, 3, "first twice (it failed once), then second");
    const mine = seen.filter((s) => attempts.some((a) => a.attempt_id === s.attemptId));
    assert.equal(mine.length, 3);
    for (const s of mine) {
      assert.ok(s.trace, `attempt ${s.attemptId} of ${s.stepName} came without trace context`);
      assert.equal(s.trace.traceId, TRACE_ID);
      assert.equal(s.trace.spanId, attemptSpanId(s.attemptId));
      assert.equal(s.trace.traceparent, `00-${TRACE_ID}-${attemptSpanId(s.attemptId)}-01`);
      assert.equal(s.trace.tracestate, TRACESTATE);
      assert.equal(s.trace.sampled, true);
      assert.notEqual(s.trace.spanId, CALLER_SPAN);
    }
    assert.equal(
      new Set(mine.map((s) => s.trace?.spanId)).size,
      3,
      "a span id per attempt, retries included",
    );
    // Stored with the task, so a broker that restarts (or another one) sends the same.
    const [row] = await stack.sql<{ traceparent: string; tracestate: string }>(
      "select traceparent, tracestate from tasks where id = $1",
      [task.task_id],
    );
    assert.deepEqual(row, { traceparent: TRACEPARENT, tracestate: TRACESTATE });
  });

  it("exports each attempt as a span of the caller's trace over OTLP/HTTP", async () => {
    const { task } = await client.submit(
      { namespace: "tr", name: "chain" },
      {},
      { traceparent: TRACEPARENT },
    );
    await stack.waitForTask(task.task_id);
    const ours = await eventually(
      "the task's three attempt spans at the OTLP receiver",
      () => {
        const s = receiver.spans.filter((x) => attr(x, "task_id") === task.task_id);
        return s.length >= 3 ? s : undefined;
      },
      20_000,
    );
    assert.equal(ours.length, 3);
    assert.ok(
      receiver.contentTypes.every((c) => c.startsWith("application/json")),
      receiver.contentTypes.join(),
    );
    const byName = new Map<string, OtlpSpan[]>();
    for (const s of ours) byName.set(s.name, [...(byName.get(s.name) ?? []), s]);
    assert.equal(byName.get("first")?.length, 2);
    assert.equal(byName.get("second")?.length, 1);
    for (const s of ours) {
      assert.equal(s.traceId, TRACE_ID);
      assert.equal(s.parentSpanId, CALLER_SPAN);
      assert.equal(s.spanId, attemptSpanId(attr(s, "attempt_id")!));
      assert.equal(attr(s, "pool_id"), pool.poolId);
      assert.equal(attr(s, "handler"), s.name === "first" ? "tr_flaky" : "tr_seen");
      assert.ok(attr(s, "step_id"));
      assert.ok(BigInt(s.endTimeUnixNano) >= BigInt(s.startTimeUnixNano));
    }
    assert.deepEqual(
      byName
        .get("first")!
        .map((s) => attr(s, "outcome"))
        .sort(),
      ["complete", "error"],
    );
    assert.equal(attr(byName.get("second")![0]!, "outcome"), "complete");
  });

  it("gives a task submitted without a traceparent a trace of its own, its id", async () => {
    const { task } = await client.submit({ namespace: "tr", name: "chain" }, {});
    const done = await stack.waitForTask(task.task_id);
    const output = done.steps?.find((s) => s.name === "second")?.output as { trace: StepTrace };
    const traceId = task.task_id.replaceAll("-", "");
    assert.equal(output.trace.traceId, traceId);
    assert.equal(output.trace.tracestate, undefined);
    assert.match(output.trace.traceparent, new RegExp(`^00-${traceId}-[0-9a-f]{16}-01$`));
    const [row] = await stack.sql<{ traceparent: string | null }>(
      "select traceparent from tasks where id = $1",
      [task.task_id],
    );
    assert.equal(row?.traceparent, null, "nothing stored: the id says it");
    // Its spans are roots of that trace.
    const spans = await eventually("the spans of the task without a traceparent", () => {
      const s = receiver.spans.filter((x) => attr(x, "task_id") === task.task_id);
      return s.length >= 3 ? s : undefined;
    });
    for (const s of spans) {
      assert.equal(s.traceId, traceId);
      assert.ok(!s.parentSpanId, `span ${s.name} has parent ${s.parentSpanId}`);
    }
  });

  for (const [title, traceparent] of [
    ["upper-case hex", TRACEPARENT.toUpperCase()],
    ["an all-zero trace id", `00-${"0".repeat(32)}-${CALLER_SPAN}-01`],
    ["version ff", `ff-${TRACE_ID}-${CALLER_SPAN}-01`],
  ] as const) {
    it(`refuses a traceparent with ${title} as schema_violation at /traceparent, and goes on serving`, async () => {
      const err = await client.submit({ namespace: "tr", name: "chain" }, {}, { traceparent }).then(
        () => undefined,
        (e: unknown) => e,
      );
      assert.ok(err instanceof BrokerError, `expected a BrokerError, got ${String(err)}`);
      assert.equal(err.code, "schema_violation");
      assert.match(err.message, /traceparent/);
      const { task } = await client.submit(
        { namespace: "tr", name: "chain" },
        {},
        { traceparent: TRACEPARENT },
      );
      assert.equal((await stack.waitForTask(task.task_id)).state, "complete");
    });
  }

  it("sends no trace to a pool that did not ask for it (an older SDK), which completes its step", async () => {
    const old = RawPeer.connect(stack.endpoint);
    try {
      const welcome = await old.hello(["tr_old"], { heartbeatMs: 100 });
      assert.ok(welcome["broker_id"]);
      const { task } = await client.submit(
        { namespace: "tr", name: "old" },
        {},
        { traceparent: TRACEPARENT },
      );
      const step = await old.next("STEP", 10_000);
      const items = step.body["steps"] as Record<string, unknown>[];
      assert.equal(items.length, 1);
      assert.ok(!("trace" in items[0]!), `an older pool's schema would refuse: ${JSON.stringify(items[0])}`);
      await old.send("RESULT", {
        results: [
          { attempt_id: items[0]!["attempt_id"] as string, status: "complete", output: { old: true } },
        ],
      });
      assert.deepEqual((await old.next("ACK")).body["acks"], [
        { attempt_id: items[0]!["attempt_id"], outcome: "stored" },
      ]);
      assert.equal((await stack.waitForTask(task.task_id)).state, "complete");
      // Its attempt is still a span of the caller's trace.
      await eventually("the older pool's attempt as a span", () =>
        receiver.spans.find((s) => attr(s, "task_id") === task.task_id && s.traceId === TRACE_ID),
      );
    } finally {
      old.close();
    }
    // and a pool that reads trace context is served as before
    const { task } = await client.submit(
      { namespace: "tr", name: "chain" },
      {},
      { traceparent: TRACEPARENT },
    );
    assert.equal((await stack.waitForTask(task.task_id)).state, "complete");
  });

  it("exports only when the standard OTLP variables ask for it", async () => {
    assert.equal(traceSinkFromEnv(silent, {}), NO_TRACES);
    assert.equal(traceSinkFromEnv(silent, { OTEL_EXPORTER_OTLP_ENDPOINT: "" }), NO_TRACES);
    assert.equal(
      traceSinkFromEnv(silent, { OTEL_EXPORTER_OTLP_ENDPOINT: receiver.url, OTEL_TRACES_EXPORTER: "none" }),
      NO_TRACES,
    );
    const on = traceSinkFromEnv(silent, { OTEL_EXPORTER_OTLP_ENDPOINT: "http://127.0.0.1:9" });
    assert.ok(on instanceof TraceExporter);
    await on.shutdown();
  });
});
