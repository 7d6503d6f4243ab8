/**
 * The HTTP side beside a real broker, a real in-process pool and a real
 * PostgreSQL: probes, /metrics, the JSON API's filters and paging, the
 * operators' actions, live updates, and every refusal (auth, Host, Origin,
 * content type, body size), each followed by proof the server still serves.
 */
import { strict as assert } from "node:assert";
import { randomUUID } from "node:crypto";
import { request } from "node:http";
import { HttpAuth } from "../../broker/http/HttpAuth";
import { checkHttpOptions } from "../../broker/http/HttpServer";
import { openDatabase } from "../../broker/db/openDatabase";
import { type HttpSide, serveHttp } from "../../broker/http/serveHttp";
import { StateManager } from "../../broker/state/StateManager";
import type { JsonObject } from "../../broker/state/types";
import { HandlerPool, PermanentError } from "../../handlers-node";
import { databaseUrl } from "../support/db";
import { eventually, silent, useBrokerStack } from "../support/stack";
import { TOKEN, get, parseMetrics, post, raw, startHttp } from "./support";

const DIAMOND = {
  namespace: "web",
  name: "diamond",
  version: "1",
  steps: [
    { name: "a", handler: "echo" },
    { name: "b", handler: "echo", depends_on: ["a"] },
    { name: "c", handler: "echo", depends_on: ["a"] },
    { name: "d", handler: "echo", depends_on: ["b", "c"] },
  ],
};
const FAILING = {
  namespace: "web",
  name: "failing",
  version: "1",
  steps: [
    { name: "boom", handler: "boom", retry: { max_attempts: 1 } },
    { name: "after", handler: "echo", depends_on: ["boom"] },
  ],
};
const SLOW = { namespace: "web", name: "slow", version: "1", steps: [{ name: "wait", handler: "gate" }] };
const UNSERVED = {
  namespace: "web",
  name: "unserved",
  version: "1",
  steps: [{ name: "x", handler: "nobody" }],
};

const METRIC_FAMILIES = [
  "stepbroker_steps_dispatched_total",
  "stepbroker_steps_completed_total",
  "stepbroker_steps_failed_total",
  "stepbroker_steps_retried_total",
  "stepbroker_steps_timed_out_total",
  "stepbroker_steps_abandoned_total",
  "stepbroker_step_duration_seconds",
  "stepbroker_queue_ready_steps",
  "stepbroker_queue_oldest_ready_age_seconds",
  "stepbroker_pool_in_flight",
  "stepbroker_pools",
  "stepbroker_pool_credit",
  "stepbroker_pool_heartbeat_age_seconds",
  "stepbroker_commit_batch_size",
  "stepbroker_commit_latency_seconds",
  "stepbroker_claim_latency_seconds",
  "stepbroker_results_awaiting_commit",
  "stepbroker_protocol_faults_total",
  "stepbroker_db_connection_errors_total",
  "process_cpu_user_seconds_total",
  "process_resident_memory_bytes",
  "nodejs_eventloop_lag_seconds",
];

describe("the HTTP server beside a broker (inproc, real PostgreSQL)", function () {
  this.timeout(60_000);
  const stack = useBrokerStack("http_api", "inproc");
  let http: HttpSide;
  let base = "";
  let pool: HandlerPool;
  /** Releases the `gate` handler's waiting steps. */
  let openGate: () => void = () => undefined;
  let gate = Promise.resolve();
  const closeGate = () => {
    gate = new Promise<void>((r) => (openGate = r));
  };

  before(async () => {
    for (const t of [DIAMOND, FAILING, SLOW, UNSERVED]) await stack.registerTemplate(t);
    closeGate();
    pool = new HandlerPool({ endpoint: stack.endpoint, capacity: 8, poolId: "web-pool", logger: silent });
    pool.handle("echo", async (step) => ({
      inputs: step.inputs,
      n: (step.context as { n?: number }).n ?? null,
    }));
    pool.handle("boom", async () => {
      throw new PermanentError("boom: the handler refuses this order");
    });
    pool.handle("gate", async (_step, ctx) => {
      await Promise.race([gate, new Promise((r) => ctx.signal.addEventListener("abort", r))]);
      return { opened: true };
    });
    await pool.start();
    http = await startHttp(stack);
    base = http.server.url;
  });
  after(async function () {
    this.timeout(30_000);
    openGate();
    await http?.stop();
    await pool?.close({ drainMs: 1000 });
  });

  async function submit(template: { namespace: string; name: string }, context: JsonObject = {}) {
    const out = await stack.broker.submit({ namespace: template.namespace, name: template.name, context });
    return out.task.task_id;
  }

  /** A well-behaved task still completes: the server's refusals left the broker serving. */
  async function diamondStillCompletes(): Promise<void> {
    const id = await submit(DIAMOND, { n: -1 });
    assert.equal((await stack.waitForTask(id, 20_000)).state, "complete");
  }

  describe("probes", () => {
    it("GET /healthz says the process is up", async () => {
      const r = await get(base, "/healthz");
      assert.equal(r.status, 200);
      assert.equal(r.json().status, "ok");
    });

    it("GET /readyz checks the database and the broker; 503 names what is not ready", async () => {
      const r = await get(base, "/readyz");
      assert.equal(r.status, 200, r.text);
      const body = r.json<{ status: string; database: string; endpoints: string[] }>();
      assert.equal(body.status, "ready");
      assert.equal(body.database, "ok");
      assert.deepEqual(body.endpoints, stack.broker.endpoints);
      const stopped = await startHttp(stack, { running: () => false });
      try {
        const n = await get(stopped.server.url, "/readyz");
        assert.equal(n.status, 503);
        assert.match(n.json<{ problems: string[] }>().problems.join(), /broker: not serving/);
      } finally {
        await stopped.stop();
      }
    });
  });

  it("readyz says the database does not answer when it does not", async () => {
    const db = await openDatabase({ databaseUrl: databaseUrl(), schema: stack.schema, poolSize: 1 });
    const closed = new StateManager(db);
    await closed.close();
    const side = await serveHttp({
      broker: stack.broker,
      state: closed,
      logger: silent,
      listen: "127.0.0.1:0",
    });
    try {
      const r = await get(side!.server.url, "/readyz");
      assert.equal(r.status, 503);
      const body = r.json<{ status: string; problems: string[] }>();
      assert.equal(body.status, "not_ready");
      assert.match(body.problems[0]!, /^database: /);
      assert.equal((await get(side!.server.url, "/healthz")).status, 200, "the process is still up");
    } finally {
      await side?.stop();
    }
  });

  it("turns itself off when only the default address is busy, and fails when it was asked for", async () => {
    const port = Number(new URL(base).port);
    const quiet = await serveHttp({
      broker: stack.broker,
      state: stack.sm,
      logger: silent,
      listen: `127.0.0.1:${port}`,
      explicit: false,
    });
    assert.equal(quiet, undefined);
    await assert.rejects(
      serveHttp({ broker: stack.broker, state: stack.sm, logger: silent, listen: `127.0.0.1:${port}` }),
      /cannot serve HTTP on 127\.0\.0\.1:\d+: another process uses this address; stop it, choose another with --http, or pass --no-http/,
    );
    assert.equal((await get(base, "/healthz")).status, 200);
  });

  describe("GET /metrics", () => {
    it("answers the Prometheus text format with every family the broker documents", async () => {
      const r = await get(base, "/metrics");
      assert.equal(r.status, 200);
      assert.match(String(r.headers["content-type"]), /^text\/plain; version=0\.0\.4/);
      const families = parseMetrics(r.text);
      for (const f of METRIC_FAMILIES) assert.ok(families.has(f), `no metric family ${f}`);
    });

    it("reads queue depth from the database and pools from the broker at scrape time", async () => {
      const ids = [await submit(UNSERVED), await submit(UNSERVED), await submit(UNSERVED)];
      closeGate();
      const slow = await submit(SLOW);
      const scrape = async () => parseMetrics((await get(base, "/metrics")).text);
      const sample = (
        m: Map<string, { labels: Record<string, string>; value: number }[]>,
        f: string,
        k: string,
        v: string,
      ) => m.get(f)?.find((s) => s.labels[k] === v)?.value;
      const m = await eventually("the gate step in flight", async () => {
        const x = await scrape();
        return sample(x, "stepbroker_pool_in_flight", "pool", "web-pool") === 1 ? x : undefined;
      });
      assert.equal(sample(m, "stepbroker_queue_ready_steps", "handler", "nobody"), 3);
      assert.ok((sample(m, "stepbroker_queue_oldest_ready_age_seconds", "handler", "nobody") ?? -1) >= 0);
      assert.equal(m.get("stepbroker_pools")?.[0]?.value, 1);
      assert.equal(sample(m, "stepbroker_pool_credit", "pool", "web-pool"), 7);
      assert.ok((sample(m, "stepbroker_pool_heartbeat_age_seconds", "pool", "web-pool") ?? -1) >= 0);
      // no id of any kind is a label value
      for (const samples of m.values())
        for (const s of samples)
          for (const v of Object.values(s.labels))
            for (const id of [...ids, slow]) assert.ok(!v.includes(id));
      openGate();
      await stack.waitForTask(slow);
      await eventually("in flight back to 0", async () =>
        sample(await scrape(), "stepbroker_pool_in_flight", "pool", "web-pool") === 0 ? true : undefined,
      );
      for (const id of ids) await stack.broker.cancel(id);
      await eventually("the queue drained", async () =>
        sample(await scrape(), "stepbroker_queue_ready_steps", "handler", "nobody") === undefined
          ? true
          : undefined,
      );
    });
  });

  describe("metrics the broker reports as it works", () => {
    it("counts the dispatch, the completion, the commit and the claim of a task that ran", async () => {
      // Tests above restart the broker: the one serving now reports to these metrics as serveHttp would have it.
      stack.broker.observe(http.metrics);
      openGate();
      await stack.waitForTask(await submit(SLOW));
      const text = (await get(base, "/metrics")).text;
      const value = (re: RegExp): number => Number(re.exec(text)?.[1] ?? 0);
      assert.ok(
        value(/^stepbroker_steps_dispatched_total\{handler="gate",pool="web-pool"\} (\S+)$/m) >= 1,
        "dispatched",
      );
      assert.ok(
        value(/^stepbroker_steps_completed_total\{handler="gate",pool="web-pool"\} (\S+)$/m) >= 1,
        "completed",
      );
      assert.ok(
        value(/^stepbroker_step_duration_seconds_count\{handler="gate"\} (\S+)$/m) >= 1,
        "duration observed",
      );
      assert.ok(value(/^stepbroker_commit_batch_size_count (\S+)$/m) >= 1, "a commit observed");
      assert.ok(value(/^stepbroker_claim_latency_seconds_count (\S+)$/m) >= 1, "a claim observed");
    });
  });

  describe("the JSON API", () => {
    const made: string[] = [];
    before(async function () {
      this.timeout(40_000);
      for (let i = 0; i < 5; i++)
        made.push(await submit(DIAMOND, { n: i, tag: i % 2 ? "Beta-odd" : "alpha" }));
      for (const id of made) await stack.waitForTask(id, 20_000);
    });

    it("pages tasks newest first with a keyset cursor, filtered by template and state", async () => {
      const seen: string[] = [];
      let next: string | null = null;
      let pages = 0;
      do {
        const r = await get(
          base,
          `/api/tasks?template=web/diamond&state=complete&limit=2${next ? `&before=${next}` : ""}`,
        );
        assert.equal(r.status, 200, r.text);
        const page = r.json<{
          tasks: { task_id: string; state: string; steps_total: number; steps_done: number }[];
          next: string | null;
        }>();
        assert.ok(page.tasks.length <= 2);
        for (const t of page.tasks) {
          assert.equal(t.state, "complete");
          assert.equal(t.steps_done, 4);
          assert.equal(t.steps_total, 4);
          seen.push(t.task_id);
        }
        next = page.next;
        pages++;
      } while (next !== null && pages < 10);
      // every diamond made here (and those of earlier tests, if any), each once, newest first
      for (const id of made) assert.ok(seen.includes(id), `task ${id} missing from the pages`);
      assert.equal(new Set(seen).size, seen.length);
      assert.deepEqual([...seen].sort().reverse(), seen);
      assert.ok(pages >= 3);
      const bare = (await get(base, "/api/tasks?template=diamond&limit=500")).json<{ tasks: unknown[] }>();
      assert.equal(bare.tasks.length, seen.length, "a bare template name matches too");
    });

    it("filters by text in the context, case-insensitively", async () => {
      const r = (await get(base, "/api/tasks?text=beta-ODD")).json<{ tasks: { task_id: string }[] }>();
      assert.deepEqual(new Set(r.tasks.map((t) => t.task_id)), new Set([made[1], made[3]]));
      const byId = (await get(base, `/api/tasks?text=${made[2]!.slice(-12)}`)).json<{
        tasks: { task_id: string }[];
      }>();
      assert.deepEqual(
        byId.tasks.map((t) => t.task_id),
        [made[2]],
      );
    });

    it("refuses bad filters with a JSON error that says what to send", async () => {
      for (const [q, re] of [
        ["state=bogus", /state must be one of pending, in_progress/],
        ["limit=0", /limit must be an integer from 1 to 500/],
        ["limit=x", /limit must be an integer/],
        ["before=nope", /before must be a task id/],
        [`text=${"x".repeat(201)}`, /longer than 200/],
      ] as const) {
        const r = await get(base, `/api/tasks?${q}`);
        assert.equal(r.status, 400, q);
        assert.match(r.json<{ error: { message: string } }>().error.message, re);
      }
    });

    it("shows one task with its steps, edges, attempts, transitions and explain", async () => {
      const r = await get(base, `/api/tasks/${made[0]}`);
      assert.equal(r.status, 200, r.text);
      const d = r.json<{
        task: { state: string; steps: { name: string; output: { n: number } }[] };
        edges: { from: string; to: string }[];
        attempts: { stepName: string; poolId: string; outcome: string }[];
        transitions: { stepName: string | null; to: string }[];
        explain: { name: string }[];
      }>();
      assert.equal(d.task.state, "complete");
      assert.deepEqual(
        d.task.steps.map((s) => s.name),
        ["a", "b", "c", "d"],
      );
      assert.equal(d.task.steps[0]!.output.n, 0);
      assert.deepEqual(d.edges.map((e) => `${e.from}>${e.to}`).sort(), ["a>b", "a>c", "b>d", "c>d"]);
      assert.equal(d.attempts.length, 4);
      for (const a of d.attempts) {
        assert.equal(a.poolId, "web-pool");
        assert.equal(a.outcome, "complete");
      }
      assert.ok(
        d.transitions.some((t) => t.stepName === null && t.to === "complete"),
        "the task's own transitions",
      );
      assert.ok(d.transitions.some((t) => t.stepName === "d" && t.to === "complete"));
      assert.equal(d.explain.length, 4);
      assert.equal((await get(base, `/api/tasks/${randomUUID()}`)).status, 404);
      const bad = await get(base, "/api/tasks/not-a-uuid");
      assert.equal(bad.status, 400);
      assert.match(bad.text, /is not a task id/);
    });

    it("lists pools, templates and the throughput of the last minutes", async () => {
      const pools = (await get(base, "/api/pools")).json<{
        pools: { pool_id: string; credit: number; capacity: number }[];
      }>();
      assert.equal(pools.pools.length, 1);
      assert.equal(pools.pools[0]!.pool_id, "web-pool");
      assert.equal(pools.pools[0]!.capacity, 8);
      const templates = (await get(base, "/api/templates")).json<{ templates: { name: string }[] }>();
      assert.ok(templates.templates.some((t) => t.name === "diamond"));
      const tp = (await get(base, "/api/throughput?minutes=5")).json<{
        throughput: { outcome: string; count: number }[];
        queue: unknown[];
      }>();
      const complete = tp.throughput.filter((r) => r.outcome === "complete").reduce((n, r) => n + r.count, 0);
      assert.ok(complete >= 20, `at least the 5 diamonds' 20 attempts, got ${complete}`);
      assert.equal((await get(base, "/api/throughput?minutes=500")).status, 400);
      // sampled by the server (every 100 ms here), so a fresh page has the recent past at once
      const history = (await get(base, "/api/throughput")).json<{
        queue_history: { at: string; ready: number }[];
      }>().queue_history;
      assert.ok(history.length >= 2, `samples: ${history.length}`);
      for (const h of history)
        assert.ok(Number.isInteger(h.ready) && h.ready >= 0 && !Number.isNaN(Date.parse(h.at)));
      const nope = await get(base, "/api/nothing");
      assert.equal(nope.status, 404);
      assert.equal(nope.json<{ error: { code: string } }>().error.code, "not_found");
    });

    it("sends live ticks as server-sent events", async () => {
      const url = new URL("/api/events", base);
      const first = await new Promise<string>((resolve, reject) => {
        const req = request(url, (res) => {
          assert.equal(res.headers["content-type"], "text/event-stream");
          let buf = "";
          res.on("data", (c: Buffer) => {
            buf += c.toString();
            const m = /event: tick\ndata: (.*)\n\n/.exec(buf);
            if (m) {
              req.destroy();
              resolve(m[1]!);
            }
          });
        });
        req.on("error", (e) => (e.message.includes("aborted") ? undefined : reject(e)));
        setTimeout(() => reject(new Error("no tick within 5 s")), 5000).unref();
        req.end();
      });
      const tick = JSON.parse(first) as { pools: number; ready: number };
      assert.equal(tick.pools, 1);
      assert.equal(typeof tick.ready, "number");
    });
  });

  describe("operators' actions", () => {
    it("retries and then resolves a failed step by hand; the task completes with that output", async () => {
      const id = await submit(FAILING);
      assert.equal((await stack.waitForTask(id)).state, "error");
      const [boom] = await stack.sql<{ id: string }>(
        "select id from steps where task_id = $1 and name = 'boom'",
        [id],
      );
      const retried = await post(base, `/api/steps/${boom!.id}/retry`);
      assert.equal(retried.status, 200, retried.text);
      assert.deepEqual(retried.json<{ retried: string[] }>().retried, [boom!.id]);
      await eventually("the retried attempt failed again", async () => {
        const [row] = await stack.sql<{ n: number }>(
          "select count(*)::int as n from step_attempts where step_id = $1 and outcome = 'error'",
          [boom!.id],
        );
        return row!.n === 2 ? true : undefined;
      });
      await eventually("the task in error again", async () =>
        (await stack.broker.status(id))?.state === "error" ? true : undefined,
      );
      const resolved = await post(base, `/api/steps/${boom!.id}/resolve`, { output: { fixed: "by hand" } });
      assert.equal(resolved.status, 200, resolved.text);
      const task = await stack.waitForTask(id);
      assert.equal(task.state, "complete");
      const [row] = await stack.sql<{ state: string; output: unknown }>(
        "select state, output from steps where id = $1",
        [boom!.id],
      );
      assert.equal(row!.state, "resolved_manually");
      assert.deepEqual(row!.output, { fixed: "by hand" });
      const again = await post(base, `/api/steps/${boom!.id}/resolve`, { output: 1 });
      assert.equal(again.status, 409);
      assert.match(
        again.json<{ error: { message: string } }>().error.message,
        /only a running or failed task/,
      );
    });

    it("cancels a running task; the database says cancelled and its handler was told to stop", async () => {
      closeGate();
      const id = await submit(SLOW);
      await eventually("the gate step in flight", async () =>
        stack.broker.listPools()[0]?.in_flight === 1 ? true : undefined,
      );
      const r = await post(base, `/api/tasks/${id}/cancel`);
      assert.equal(r.status, 200, r.text);
      assert.equal(r.json<{ task: { state: string } }>().task.state, "cancelled");
      const [row] = await stack.sql<{ state: string }>("select state from tasks where id = $1", [id]);
      assert.equal(row!.state, "cancelled");
      await eventually("the pool let the attempt go", async () =>
        stack.broker.listPools()[0]?.in_flight === 0 ? true : undefined,
      );
      assert.equal((await post(base, `/api/tasks/${randomUUID()}/cancel`)).status, 404);
      await diamondStillCompletes();
    });
  });

  describe("refusals", () => {
    it("takes actions only as JSON from its own origin", async () => {
      const id = await submit(UNSERVED);
      const asText = await raw(
        base,
        "POST",
        `/api/tasks/${id}/cancel`,
        { "Content-Type": "text/plain" },
        "{}",
      );
      assert.equal(asText.status, 415);
      assert.match(asText.text, /Content-Type: application\/json/);
      const cross = await raw(
        base,
        "POST",
        `/api/tasks/${id}/cancel`,
        { "Content-Type": "application/json", Origin: "http://evil.example" },
        "{}",
      );
      assert.equal(cross.status, 403);
      const badJson = await raw(
        base,
        "POST",
        `/api/steps/${randomUUID()}/resolve`,
        { "Content-Type": "application/json" },
        "{oops",
      );
      assert.equal(badJson.status, 400);
      assert.match(badJson.text, /not JSON/);
      assert.equal((await raw(base, "DELETE", `/api/tasks/${id}`)).status, 405);
      const [row] = await stack.sql<{ state: string }>("select state from tasks where id = $1", [id]);
      assert.equal(row!.state, "pending", "no refused request changed the task (no pool serves it: pending)");
      await stack.broker.cancel(id);
    });

    it("answers only a loopback Host without a token (DNS rebinding)", async () => {
      const r = await raw(base, "GET", "/api/tasks", { Host: "evil.example:80" });
      assert.equal(r.status, 403);
      assert.match(r.text, /not loopback/);
      assert.equal((await raw(base, "GET", "/api/tasks", { Host: "localhost" })).status, 200);
    });

    it("refuses a body over 1 MiB with 413 and keeps serving", async () => {
      const big = JSON.stringify({ output: "x".repeat(2 * 1024 * 1024) });
      const r = await raw(
        base,
        "POST",
        `/api/steps/${randomUUID()}/resolve`,
        { "Content-Type": "application/json" },
        big,
      );
      assert.equal(r.status, 413);
      assert.match(r.json<{ error: { message: string } }>().error.message, /larger than 1048576 bytes/);
      // the same without a declared length (chunked): counted as it arrives
      const chunked = await new Promise<number>((resolve, reject) => {
        const req = request(new URL(`/api/steps/${randomUUID()}/resolve`, base), {
          method: "POST",
          headers: { "Content-Type": "application/json", "Transfer-Encoding": "chunked" },
        });
        req.on("response", (res) => {
          res.resume();
          resolve(res.statusCode ?? 0);
        });
        req.on("error", reject);
        const chunk = Buffer.alloc(256 * 1024, 0x20);
        let sent = 0;
        const write = () => {
          while (sent < 8 && req.write(chunk)) sent++;
          if (sent < 8) req.once("drain", () => (sent++, write()));
          else req.end();
        };
        write();
      });
      assert.equal(chunked, 413);
      assert.equal((await get(base, "/healthz")).status, 200);
      await diamondStillCompletes();
    });

    it("with a token: refuses the API, metrics and actions without it or with a wrong one", async () => {
      const guarded = await startHttp(stack, { token: TOKEN });
      const url = guarded.server.url;
      try {
        for (const path of ["/api/tasks", "/metrics", "/api/pools", "/api/events"]) {
          const none = await get(url, path);
          assert.equal(none.status, 401, path);
          assert.equal(none.headers["www-authenticate"], 'Bearer realm="stepbroker"');
          assert.match(none.text, /Authorization: Bearer/);
          const wrong = await get(url, path, `${TOKEN}x`);
          assert.equal(wrong.status, 401, path);
          assert.match(wrong.text, /does not match/);
        }
        assert.equal((await get(url, "/api/tasks", TOKEN)).status, 200);
        assert.equal((await get(url, "/metrics", TOKEN)).status, 200);
        // probes and the dashboard's files carry no data: open
        assert.equal((await get(url, "/healthz")).status, 200);
        assert.equal((await get(url, "/")).status, 200);
        const id = await submit(UNSERVED);
        assert.equal((await post(url, `/api/tasks/${id}/cancel`)).status, 401);
        assert.equal((await post(url, `/api/tasks/${id}/cancel`, {}, "wrong-token-0123456789")).status, 401);
        const [row] = await stack.sql<{ state: string }>("select state from tasks where id = $1", [id]);
        assert.equal(row!.state, "pending", "the refused cancels changed nothing");
        assert.equal((await post(url, `/api/tasks/${id}/cancel`, {}, TOKEN)).status, 200);
      } finally {
        await guarded.stop();
      }
    });

    it("refuses a non-loopback address without a token unless insecure", () => {
      assert.throws(
        () => checkHttpOptions("0.0.0.0:8080", undefined, false),
        /not loopback\) without a token: set --http-token-file/,
      );
      assert.throws(() => checkHttpOptions("[::]:8080", new HttpAuth(undefined), false), /without a token/);
      assert.doesNotThrow(() => checkHttpOptions("0.0.0.0:8080", new HttpAuth(TOKEN), false));
      assert.doesNotThrow(() => checkHttpOptions("0.0.0.0:8080", undefined, true));
      assert.doesNotThrow(() => checkHttpOptions("localhost:8080", undefined, false));
      assert.throws(() => checkHttpOptions("nonsense", undefined, false), /is not host:port/);
      assert.throws(() => new HttpAuth("short"), /at least 16 characters/);
    });
  });
});
