/**
 * Values PostgreSQL cannot store, and nesting that would cost a parser
 * dearly, sent over real tcp:// sockets to a real broker on a real
 * PostgreSQL by raw ZeroMQ peers. Each is refused at the door with a stable
 * code and a JSON Pointer to the value, and a well-behaved pool connected
 * before it still gets a task done at once: nothing reaches the group commit
 * to hold every other result behind it.
 */
import { strict as assert } from "node:assert";
import { pino } from "pino";
import { HandlerPool } from "../../handlers-node";
import {
  MAX_DEPTH,
  MAX_VALUE_DEPTH,
  SIGNATURE,
  decodeBody,
  encodeBody,
  type ErrorCode,
} from "../../protocol";
import { RawPeer, type Incoming } from "../support/rawPeer";
import { silent, stepOf, useBrokerStack } from "../support/stack";

/** A raw pool heartbeats well inside the broker's liveness (FAST: 200 ms × 5). */
const RAW_HEARTBEAT_MS = 100;
/** An honest task completes in far less than this on a loaded machine; a lease would take longer. */
const HONEST_TASK_MS = 8000;
/** Much longer than HONEST_TASK_MS: a task that completes only after a lease expires fails the test. */
const LEASE_MS = 60_000;

type Json = null | boolean | number | string | Json[] | { [k: string]: Json };

/** An array nested `levels` deep around 1: nested(1) is [1]. */
function nested(levels: number): Json {
  let v: Json = 1;
  for (let i = 0; i < levels; i++) v = [v];
  return v;
}

describe("the broker refuses values PostgreSQL cannot store, and deep nesting, over tcp://", function () {
  this.timeout(30_000);
  const stack = useBrokerStack("hostile_values", "tcp", {
    logger: pino({ level: "silent" }),
    // What is measured here is what each body costs the decoder; the per-peer work budget
    // (test/broker/hostile-floods.test.ts) would cut the 200 KB flood off after its first 64 MiB.
    peerBytesPerSecond: 16 * 1024 ** 3,
  });
  const cleanups: (() => Promise<void> | void)[] = [];
  let counter = 0;

  before(async () => {
    await stack.registerTemplate({
      namespace: "hostile",
      name: "echo",
      version: "1",
      steps: [{ name: "only", handler: "echo", timeout_ms: LEASE_MS }],
    });
  });
  afterEach(async () => {
    while (cleanups.length) await cleanups.pop()!();
  });

  function peer(): RawPeer {
    const p = RawPeer.connect(stack.endpoint);
    cleanups.push(() => p.close());
    return p;
  }

  /** A well-behaved pool, welcomed before the bad input; runTask() proves the broker still serves it. */
  async function goodPool(): Promise<{ runTask(): Promise<void> }> {
    const p = new HandlerPool({
      endpoint: stack.endpoint,
      poolId: `good-${++counter}`,
      capacity: 2,
      logger: silent,
    });
    p.handle("echo", async (step) => ({ echoed: step.context }));
    await p.start();
    cleanups.push(() => p.close({ drainMs: 1000 }));
    return {
      async runTask() {
        const started = Date.now();
        const { task } = await stack.broker.submit({
          namespace: "hostile",
          name: "echo",
          context: { after: "hostile input" },
        });
        const done = await stack.waitForTask(task.task_id, HONEST_TASK_MS);
        assert.equal(done.state, "complete", "the well-behaved pool completed its task");
        assert.deepEqual(stepOf(done, "only").output, { echoed: { after: "hostile input" } });
        assert.ok(Date.now() - started < HONEST_TASK_MS, "at once, not after a lease");
      },
    };
  }

  /** A raw pool holding one attempt of a fresh task of its own handler. */
  async function rawAttempt(): Promise<{ pool: RawPeer; attemptId: string; taskId: string }> {
    const handler = `raw_${++counter}`;
    await stack.registerTemplate({
      namespace: "hostile",
      name: handler,
      version: "1",
      steps: [{ name: "only", handler, timeout_ms: LEASE_MS, retry: { max_attempts: 3 } }],
    });
    const pool = peer();
    await pool.hello([handler], { heartbeatMs: RAW_HEARTBEAT_MS });
    const { task } = await stack.broker.submit({ namespace: "hostile", name: handler, context: {} });
    const step = await pool.next("STEP", 10_000);
    const [dispatch] = step.body.steps as { attempt_id: string }[];
    return { pool, attemptId: dispatch!.attempt_id, taskId: task.task_id };
  }

  function assertError(m: Incoming, code: ErrorCode, extra: Record<string, unknown>): void {
    assert.equal(m.command, "ERROR", `expected ERROR ${code}, got ${m.command} ${JSON.stringify(m.body)}`);
    assert.equal(m.body.code, code, `ERROR code, in ${JSON.stringify(m.body)}`);
    for (const [k, v] of Object.entries(extra))
      assert.deepEqual(m.body[k], v, `ERROR ${k}, in ${JSON.stringify(m.body)}`);
  }

  interface ResultCase {
    title: string;
    result: (attemptId: string) => Record<string, unknown>;
    code: ErrorCode;
    instancePath: string;
    encoding?: "json" | "msgpack";
    /** A phrase the message must hold (the limit, for depth). */
    says?: string;
  }
  const complete = (output: Json) => (attempt_id: string) => ({ attempt_id, status: "complete", output });
  const CASES: ResultCase[] = [
    {
      title: "U+0000 in output",
      result: complete({ a: [1, 2, "before\u0000after"] }),
      code: "unstorable_value",
      instancePath: "/results/0/output/a/2",
    },
    {
      title: "U+0000 in error.message",
      result: (attempt_id) => ({
        attempt_id,
        status: "error",
        error: { type: "Boom", message: "nul \u0000 here", retryable: true },
      }),
      code: "unstorable_value",
      instancePath: "/results/0/error/message",
    },
    {
      title: "U+0000 in usage",
      result: (attempt_id) => ({
        attempt_id,
        status: "complete",
        output: null,
        usage: { cost: 0, artifacts: ["s3://bucket/\u0000"] },
      }),
      code: "unstorable_value",
      instancePath: "/results/0/usage/artifacts/0",
    },
    {
      title: "U+0000 in an object key of the output",
      result: complete({ ok: 1, "k\u0000y": 2 }),
      code: "unstorable_value",
      // The key is named with \u0000 as text, so the ERROR itself stays storable and decodable.
      instancePath: "/results/0/output/k\\u0000y",
    },
    {
      title: "a lone surrogate (\\ud800) in output",
      result: complete({ text: "lone \ud800 surrogate" }),
      code: "unstorable_value",
      instancePath: "/results/0/output/text",
    },
    {
      title: "U+0000 in output, in MessagePack",
      result: complete({ a: "x\u0000" }),
      code: "unstorable_value",
      instancePath: "/results/0/output/a",
      encoding: "msgpack",
    },
    {
      title: `a JSON body nested ${MAX_DEPTH + 1} levels`,
      // body, results, the result, then the output's own levels
      result: complete(nested(MAX_DEPTH + 1 - 3)),
      code: "too_deep",
      instancePath: "",
      says: `deeper than ${MAX_DEPTH} levels`,
    },
    {
      title: `a MessagePack body nested ${MAX_DEPTH + 1} levels`,
      result: complete(nested(MAX_DEPTH + 1 - 3)),
      code: "too_deep",
      instancePath: "",
      says: `deeper than ${MAX_DEPTH} levels`,
      encoding: "msgpack",
    },
    {
      title: `an output nested ${MAX_VALUE_DEPTH + 1} levels (the STEP that carries it on would pass ${MAX_DEPTH})`,
      result: complete(nested(MAX_VALUE_DEPTH + 1)),
      code: "too_deep",
      instancePath: "/results/0/output",
      says: `deeper than ${MAX_VALUE_DEPTH} levels`,
    },
  ];

  for (const c of CASES) {
    it(`answers a RESULT with ${c.title} with ${c.code} naming the value and the attempt`, async () => {
      const good = await goodPool();
      const { pool, attemptId } = await rawAttempt();
      const body = encodeBody({ results: [c.result(attemptId)] }, c.encoding ?? "json");
      await pool.sendFrames([SIGNATURE, "RESULT", body]);
      const m = await pool.next(undefined, 10_000);
      assertError(m, c.code, {
        command: "RESULT",
        instance_path: c.instancePath,
        // Only a refusal after parsing can know which result it was.
        ...(c.instancePath ? { attempt_id: attemptId } : {}),
      });
      if (c.says) assert.match(String(m.body.message), new RegExp(c.says));
      await good.runTask();
    });
  }

  it(`stores an output nested ${MAX_VALUE_DEPTH} levels, in JSON and in MessagePack`, async () => {
    for (const encoding of ["json", "msgpack"] as const) {
      const { pool, attemptId, taskId } = await rawAttempt();
      const output = { deep: nested(MAX_VALUE_DEPTH - 1) };
      await pool.sendFrames([
        SIGNATURE,
        "RESULT",
        encodeBody({ results: [complete(output)(attemptId)] }, encoding),
      ]);
      const ack = await pool.next("ACK", 10_000);
      assert.deepEqual(ack.body.acks, [{ attempt_id: attemptId, outcome: "stored" }], encoding);
      const done = await stack.waitForTask(taskId, HONEST_TASK_MS);
      assert.deepEqual(stepOf(done, "only").output, output, `${encoding}: stored as sent`);
    }
  });

  it("isolates a result that passes validation but PostgreSQL refuses: the rest of its batch is stored", async () => {
    // usage.tokens is a schema integer but a bigint column: 1e19 is out of range (SQLSTATE 22003).
    const good = await goodPool();
    const handler = `raw_${++counter}`;
    await stack.registerTemplate({
      namespace: "hostile",
      name: handler,
      version: "1",
      steps: [
        {
          name: "only",
          handler,
          timeout_ms: LEASE_MS,
          retry: { max_attempts: 2, backoff: { initial_ms: 0, jitter: 0 } },
        },
      ],
    });
    const pool = peer();
    await pool.hello([handler], { capacity: 2, heartbeatMs: RAW_HEARTBEAT_MS });
    const tasks = [];
    for (let i = 0; i < 2; i++)
      tasks.push(
        (await stack.broker.submit({ namespace: "hostile", name: handler, context: { i } })).task.task_id,
      );
    const attempts: { attempt_id: string; task_id: string }[] = [];
    while (attempts.length < 2)
      attempts.push(...((await pool.take("STEP", 10_000)).body.steps as typeof attempts));
    const [bad, fine] = attempts as [(typeof attempts)[0], (typeof attempts)[0]];
    // One RESULT, so both land in the same group commit.
    await pool.send("RESULT", {
      results: [
        { attempt_id: bad.attempt_id, status: "complete", output: { n: 1 }, usage: { tokens: 1e19 } },
        { attempt_id: fine.attempt_id, status: "complete", output: { n: 2 } },
      ],
    });
    const error = await pool.take("ERROR", 10_000);
    assertError(error, "unstorable_value", { attempt_id: bad.attempt_id, command: "RESULT" });
    const acked = new Map<string, string>();
    while (acked.size < 2)
      for (const a of (await pool.take("ACK", 10_000)).body.acks as { attempt_id: string; outcome: string }[])
        acked.set(a.attempt_id, a.outcome);
    assert.equal(acked.get(fine.attempt_id), "stored", "the good result of the same batch is stored");
    assert.equal(acked.get(bad.attempt_id), "stored", "the error that replaced the bad result is stored");
    const fineTask = await stack.waitForTask(fine.task_id, HONEST_TASK_MS);
    assert.deepEqual(stepOf(fineTask, "only").output, { n: 2 });
    // The bad attempt's step is retried now, by its policy, not after its lease.
    const retry = await pool.take("STEP", HONEST_TASK_MS);
    const [again] = retry.body.steps as { attempt_id: string; task_id: string; attempt: number }[];
    assert.equal(again!.task_id, bad.task_id);
    assert.equal(again!.attempt, 2);
    const view = await stack.broker.status(bad.task_id);
    assert.equal(stepOf(view!, "only").error?.type, "unstorable_result");
    await good.runTask();
  });

  it("answers a SUBMIT with U+0000 in its context with unstorable_value and its request_id", async () => {
    const good = await goodPool();
    const client = peer();
    const requestId = "r-nul";
    await client.sendJson("SUBMIT", {
      request_id: requestId,
      template: { namespace: "hostile", name: "echo" },
      context: { order: { note: "a\u0000b" } },
    });
    assertError(await client.next(undefined, 10_000), "unstorable_value", {
      command: "SUBMIT",
      instance_path: "/context/order/note",
      request_id: requestId,
    });
    // The same client's next, honest SUBMIT creates its task.
    await client.sendJson("SUBMIT", {
      request_id: "r-ok",
      template: { namespace: "hostile", name: "echo" },
      context: { order: { note: "ab" } },
    });
    const reply = await client.next("REPLY", 10_000);
    assert.equal(reply.body.request_id, "r-ok");
    await good.runTask();
  });

  it("serves on through 10,000 JSON bodies of 200 KB nested 100,000 deep, in bounded memory", async function () {
    this.timeout(60_000);
    const BODIES = 10_000;
    /** Bad messages in a row before the broker drops a peer; a probe between runs keeps this one counted as live. */
    const RUN = 9;
    const PROBE_MS = 1000;
    const RSS_GROWTH_MB = 300;
    const good = await goodPool();
    const attacker = peer();
    const depth = 100_000;
    const body = Buffer.from(`{"pool_id":${"[".repeat(depth)}${"]".repeat(depth)}}`);
    assert.ok(body.length > 200_000);
    global.gc?.();
    const rssBefore = process.memoryUsage().rss;
    let rssPeak = rssBefore;
    const started = Date.now();
    let errors = 0;
    let rounds = 0;
    // Rounds of RUN bodies and a probe, each round answered before the next is sent: what is
    // measured is the broker's memory, not ZeroMQ's send queue in this process.
    for (let sent = 0; sent < BODIES;) {
      for (let i = 0; i < RUN && sent < BODIES; i++, sent++)
        await attacker.sendFrames([SIGNATURE, "HELLO", body]);
      const requestId = await attacker.probe();
      for (;;) {
        const m = await attacker.next(undefined, 20_000);
        if (m.command === "REPLY" && m.body.request_id === requestId) break;
        // Every body is answered, none by parsing it.
        assert.equal(m.command, "ERROR", JSON.stringify(m.body));
        assert.equal(m.body.code, "too_deep", JSON.stringify(m.body));
        errors++;
      }
      if (++rounds % 50 === 0) rssPeak = Math.max(rssPeak, process.memoryUsage().rss);
    }
    assert.equal(errors, BODIES, "one too_deep for each body");
    const floodMs = Date.now() - started;
    const probeStarted = Date.now();
    const requestId = await attacker.probe();
    const reply = await attacker.next("REPLY", PROBE_MS);
    assert.equal(reply.body.request_id, requestId);
    const probeMs = Date.now() - probeStarted;
    await good.runTask();
    global.gc?.();
    const rssAfter = process.memoryUsage().rss;
    const mb = (n: number) => Math.round(n / 2 ** 20);
    console.log(
      `      ${BODIES} bodies of ${body.length} bytes answered in ${floodMs} ms; probe ${probeMs} ms; ` +
        `rss ${mb(rssBefore)} MB -> peak ${mb(rssPeak)} MB -> ${mb(rssAfter)} MB`,
    );
    assert.ok(
      rssPeak - rssBefore < RSS_GROWTH_MB * 2 ** 20,
      `rss grew ${mb(rssPeak - rssBefore)} MB at peak`,
    );
    assert.ok(rssAfter - rssBefore < RSS_GROWTH_MB * 2 ** 20, `rss stayed ${mb(rssAfter - rssBefore)} MB up`);
  });
});

describe("the body decoder's depth limit", () => {
  for (const encoding of ["json", "msgpack"] as const) {
    it(`${encoding}: decodes a body nested ${MAX_DEPTH} levels, refuses ${MAX_DEPTH + 1} with too_deep`, () => {
      // The body's own object is level 1.
      const ok = decodeBody(encodeBody({ a: nested(MAX_DEPTH - 1), b: [] }, encoding));
      assert.ok(ok.ok, ok.ok ? "" : ok.fault.message);
      const deep = decodeBody(encodeBody({ a: nested(MAX_DEPTH) }, encoding));
      assert.ok(!deep.ok && deep.fault.code === "too_deep", JSON.stringify(deep));
      // Brackets inside strings, escaped quotes included, are not nesting.
      const text = decodeBody(
        encodeBody({ s: '\\"[[[[{{{{'.repeat(40), a: nested(MAX_DEPTH - 1) }, encoding),
      );
      assert.ok(text.ok, text.ok ? "" : text.fault.message);
    });
  }
});
