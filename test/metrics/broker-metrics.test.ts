/**
 * BrokerMetrics' event methods, called directly: the broker services call
 * them once the broker split wires them in (until then nothing in the broker
 * can, so this is where they are proven). The scrape-time gauges are proven
 * against a real broker in test/http/http-server.test.ts.
 */
import { strict as assert } from "node:assert";
import { BrokerMetrics, OTHER_LABEL } from "../../broker/metrics/BrokerMetrics";
import { parseMetrics } from "../http/support";

async function scrape(m: BrokerMetrics) {
  return parseMetrics(await m.metrics());
}

function value(
  families: ReturnType<typeof parseMetrics>,
  family: string,
  labels: Record<string, string>,
): number | undefined {
  return families.get(family)?.find((s) => Object.entries(labels).every(([k, v]) => s.labels[k] === v))
    ?.value;
}

describe("BrokerMetrics", () => {
  it("counts dispatches and each kind of attempt ending by handler and pool", async () => {
    const m = new BrokerMetrics({ processMetrics: false });
    m.stepsDispatched("resize", "pool-a", 3);
    m.stepsDispatched("resize", "pool-b");
    m.attemptFinished("resize", "pool-a", "complete", 120);
    m.attemptFinished("resize", "pool-a", "complete", 2500);
    m.attemptFinished("resize", "pool-a", "error", 40);
    m.attemptFinished("resize", "pool-b", "timeout");
    m.attemptFinished("resize", "pool-b", "lost");
    m.stepsRetried("resize", "pool-b", 2);
    const f = await scrape(m);
    const ab = { handler: "resize", pool: "pool-a" };
    assert.equal(value(f, "stepbroker_steps_dispatched_total", ab), 3);
    assert.equal(value(f, "stepbroker_steps_dispatched_total", { pool: "pool-b" }), 1);
    assert.equal(value(f, "stepbroker_steps_completed_total", ab), 2);
    assert.equal(value(f, "stepbroker_steps_failed_total", ab), 1);
    assert.equal(value(f, "stepbroker_steps_timed_out_total", { pool: "pool-b" }), 1);
    assert.equal(value(f, "stepbroker_steps_abandoned_total", { pool: "pool-b", outcome: "lost" }), 1);
    assert.equal(value(f, "stepbroker_steps_retried_total", { pool: "pool-b" }), 2);
    // durations in seconds, by handler only
    assert.equal(
      value(f, "stepbroker_step_duration_seconds", { __name__: "stepbroker_step_duration_seconds_count" }),
      3,
    );
    const sum = value(f, "stepbroker_step_duration_seconds", {
      __name__: "stepbroker_step_duration_seconds_sum",
    });
    assert.ok(Math.abs(sum! - 2.66) < 1e-9, `sum ${sum}`);
    assert.equal(
      value(f, "stepbroker_step_duration_seconds", {
        __name__: "stepbroker_step_duration_seconds_bucket",
        le: "0.25",
      }),
      2,
    );
    const durationLabels = f.get("stepbroker_step_duration_seconds")!.flatMap((s) => Object.keys(s.labels));
    assert.ok(!durationLabels.includes("pool"));
  });

  it("records commit batches, commit and claim latency, results awaiting commit, faults and database errors", async () => {
    const m = new BrokerMetrics({ processMetrics: false });
    m.commitBatch(64, 3);
    m.commitBatch(1, 0.5);
    m.claim(2);
    m.resultsAwaitingCommit(17);
    m.protocolFault("schema_violation");
    m.protocolFault("schema_violation");
    m.protocolFault("unknown_attempt");
    m.dbError();
    const f = await scrape(m);
    const count = (family: string) => value(f, family, { __name__: `${family}_count` });
    assert.equal(count("stepbroker_commit_batch_size"), 2);
    assert.equal(
      value(f, "stepbroker_commit_batch_size", { __name__: "stepbroker_commit_batch_size_sum" }),
      65,
    );
    assert.equal(count("stepbroker_commit_latency_seconds"), 2);
    assert.equal(count("stepbroker_claim_latency_seconds"), 1);
    assert.equal(value(f, "stepbroker_results_awaiting_commit", {}), 17);
    assert.equal(value(f, "stepbroker_protocol_faults_total", { code: "schema_violation" }), 2);
    assert.equal(value(f, "stepbroker_protocol_faults_total", { code: "unknown_attempt" }), 1);
    assert.equal(value(f, "stepbroker_db_connection_errors_total", {}), 1);
  });

  it("keeps at most maxLabelValues values per label and folds the rest into other", async () => {
    const m = new BrokerMetrics({ processMetrics: false, maxLabelValues: 2 });
    for (let i = 0; i < 50; i++) m.stepsDispatched(`handler-${i}`, `pool-${i}`);
    m.stepsDispatched("handler-0", "pool-0");
    const f = await scrape(m);
    const samples = f.get("stepbroker_steps_dispatched_total")!;
    assert.deepEqual(
      new Set(samples.map((s) => s.labels.handler)),
      new Set(["handler-0", "handler-1", OTHER_LABEL]),
    );
    assert.equal(value(f, "stepbroker_steps_dispatched_total", { handler: "handler-0" }), 2);
    assert.equal(value(f, "stepbroker_steps_dispatched_total", { handler: OTHER_LABEL }), 48);
  });

  it("fills pool gauges at scrape time and leaves queue gauges out when the database does not answer", async () => {
    let pools = [
      {
        pool_id: "p1",
        sdk: { language: "node", name: "test", version: "1" },
        handlers: ["h"],
        capacity: 4,
        in_flight: 1,
        encoding: "json" as const,
        connected_at: new Date().toISOString(),
        last_seen_ms_ago: 250,
      },
    ];
    const m = new BrokerMetrics({
      processMetrics: false,
      queueDepthTimeoutMs: 100,
      sources: { pools: () => pools, queueDepth: () => new Promise(() => undefined) },
    });
    let f = await scrape(m);
    assert.equal(value(f, "stepbroker_pools", {}), 1);
    assert.equal(value(f, "stepbroker_pool_in_flight", { pool: "p1" }), 1);
    assert.equal(value(f, "stepbroker_pool_credit", { pool: "p1" }), 3);
    assert.equal(value(f, "stepbroker_pool_heartbeat_age_seconds", { pool: "p1" }), 0.25);
    assert.equal(f.get("stepbroker_queue_ready_steps")?.length, 0);
    pools = [];
    f = await scrape(m);
    assert.equal(value(f, "stepbroker_pools", {}), 0);
    assert.equal(
      value(f, "stepbroker_pool_in_flight", { pool: "p1" }),
      undefined,
      "a gone pool leaves the scrape",
    );
  });
});
