/**
 * Floods a hostile peer can send, over real sockets to a real broker on a
 * real PostgreSQL: ERRORs by the ten thousand, garbage in a pattern that
 * never trips the strike count, more messages per second than any pool
 * sends, bodies and replies over the size limit, templates linked densely
 * enough to tie up the database. Each test checks what the broker must do
 * (drop the peer, bound its log, answer the client truthfully) and that an
 * honest pool still gets a task done meanwhile or afterwards.
 */
import { strict as assert } from "node:assert";
import { randomUUID } from "node:crypto";
import { Writable } from "node:stream";
import { pino, type Logger } from "pino";
import { LogLimiter } from "../../broker/LogLimiter";
import { MAX_TEMPLATE_EDGES } from "../../broker/state/templates";
import { HandlerPool } from "../../handlers-node";
import { BrokerError, StepbrokerClient } from "../../handlers-node/client";
import { encodeMessage, MAX_CONSECUTIVE_ERRORS, SIGNATURE } from "../../protocol";
import { RawPeer } from "../support/rawPeer";
import { eventually, silent, useBrokerStack, type Stack } from "../support/stack";
import { templateAtEdgeLimit } from "../support/denseTemplates";

/** A pino logger whose lines are counted (and the first 5,000 kept) by the test. */
class CountingLog {
  lines = 0;
  bytes = 0;
  readonly kept: Record<string, unknown>[] = [];
  readonly logger: Logger;

  constructor() {
    const stream = new Writable({
      write: (chunk: Buffer, _enc, done) => {
        for (const line of chunk.toString("utf8").split("\n")) {
          if (line === "") continue;
          this.lines++;
          this.bytes += line.length + 1;
          if (this.kept.length < 5000) this.kept.push(JSON.parse(line) as Record<string, unknown>);
        }
        done();
      },
    });
    this.logger = pino({ level: "info" }, stream);
  }

  /** Lines that name this peer (its routing id is the `peer` field). */
  about(peer: string): Record<string, unknown>[] {
    return this.kept.filter((l) => l.peer === peer);
  }
}

const ECHO = { namespace: "flood", name: "echo", version: "1", steps: [{ name: "only", handler: "echo" }] };

/** An honest pool serving "echo", closed by `cleanups`. */
async function honestPool(
  stack: Stack,
  cleanups: (() => Promise<void>)[],
  poolId: string,
): Promise<HandlerPool> {
  const p = new HandlerPool({ endpoint: stack.endpoint, poolId, capacity: 4, logger: silent });
  p.handle("echo", async (step) => ({ echoed: step.context }));
  await p.start();
  cleanups.push(() => p.close({ drainMs: 1000 }));
  return p;
}

/** Submits an echo task and waits (generously) for it to complete. */
async function echoCompletes(stack: Stack, n: number): Promise<void> {
  const { task } = await stack.broker.submit({ namespace: "flood", name: "echo", context: { n } });
  const done = await stack.waitForTask(task.task_id, 20_000);
  assert.equal(done.state, "complete");
}

describe("hostile floods", function () {
  this.timeout(90_000);
  const cleanups: (() => Promise<void>)[] = [];
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c().catch(() => undefined);
  });

  describe("an ERROR flood", () => {
    const log = new CountingLog();
    const stack = useBrokerStack("flood_errors", "tcp", { logger: log.logger });
    before(() => stack.registerTemplate(ECHO));

    it("drops a peer that sends 20,000 ERRORs, writes a bounded log, and an honest task completes", async () => {
      await honestPool(stack, cleanups, "honest-errors");
      const peer = RawPeer.connect(stack.endpoint);
      cleanups.push(async () => peer.close());
      const before = log.lines;
      const body = { code: "internal_error", message: "x".repeat(200) };
      for (let i = 0; i < 20_000; i++) void peer.send("ERROR", body).catch(() => undefined);
      await peer.sendFrames(encodeMessage("ERROR", body));
      const bye = await peer.take("DISCONNECT", 20_000);
      assert.equal(bye.body.code, "too_many_errors");
      await echoCompletes(stack, 1);
      // On main every ERROR was a warn line (168 MB for 20,000); now a few per peer per 10 s.
      const written = log.lines - before;
      assert.ok(written < 60, `${written} log lines for a flood of 20,000 ERRORs`);
      assert.ok(log.bytes < 200_000, `${log.bytes} bytes of log`);
      assert.ok(log.about(peer.id).length >= 1, "the flood is logged at least once");
    });

    it(`drops a peer after ${MAX_CONSECUTIVE_ERRORS} ERRORs in a row even when each is well-formed`, async () => {
      const peer = RawPeer.connect(stack.endpoint);
      cleanups.push(async () => peer.close());
      for (let i = 0; i < MAX_CONSECUTIVE_ERRORS; i++) {
        await peer.send("ERROR", { code: "invalid_request", message: `complaint ${i}` });
      }
      const bye = await peer.take("DISCONNECT", 10_000);
      assert.equal(bye.body.code, "too_many_errors");
      // The broker answers everyone else at once.
      const prober = RawPeer.connect(stack.endpoint);
      cleanups.push(async () => prober.close());
      const requestId = await prober.probe();
      const reply = await prober.next("REPLY", 10_000);
      assert.equal(reply.body.request_id, requestId);
    });
  });

  describe("per-peer log lines", () => {
    const log = new CountingLog();
    const stack = useBrokerStack("flood_logs", "tcp", { logger: log.logger });
    before(() => stack.registerTemplate(ECHO));

    it("bounds the lines of a peer whose garbage never trips the strike count", async () => {
      await honestPool(stack, cleanups, "honest-logs");
      const peer = RawPeer.connect(stack.endpoint);
      cleanups.push(async () => peer.close());
      const rounds = 200;
      // Nine bad messages, then a good one that starts the count again: 1,800 refusals, no drop.
      for (let r = 0; r < rounds; r++) {
        for (let i = 0; i < MAX_CONSECUTIVE_ERRORS - 1; i++) await peer.sendFrames([SIGNATURE, "FROB", "{}"]);
        await peer.send("POOLS", { request_id: `r${r}` });
      }
      await eventually(
        "the last POOLS answered",
        () =>
          peer.received.some((m) => m.command === "REPLY" && m.body.request_id === `r${rounds - 1}`)
            ? true
            : undefined,
        20_000,
      );
      const refusals = peer.received.filter((m) => m.command === "ERROR").length;
      assert.equal(refusals, rounds * (MAX_CONSECUTIVE_ERRORS - 1), "every bad message is still answered");
      const lines = log.about(peer.id).length;
      assert.ok(lines >= 1 && lines <= 10, `${lines} lines about ${peer.id} for ${refusals} refusals`);
      await echoCompletes(stack, 2);
    });

    it("bounds the lines about answers lost because the peer left right after asking", async () => {
      await honestPool(stack, cleanups, "honest-gone");
      const peer = RawPeer.connect(stack.endpoint);
      const requests = 2000;
      for (let i = 0; i < requests; i++) await peer.send("POOLS", { request_id: `gone-${i}` });
      peer.close();
      // The broker answers everything it had received; each answer it cannot deliver is one lost REPLY.
      const prober = RawPeer.connect(stack.endpoint);
      cleanups.push(async () => prober.close());
      await prober.probe();
      await prober.next("REPLY", 20_000);
      const lost = log
        .about(peer.id)
        .filter((l) => typeof l.msg === "string" && l.msg.startsWith("could not deliver"));
      assert.ok(lost.length >= 1, "some answers were lost (else this test proves nothing)");
      assert.ok(lost.length <= 10, `${lost.length} lines about undeliverable answers to ${peer.id}`);
      await echoCompletes(stack, 7);
    });

    it("writes one summary with the count of what it left out, and forgets the key", () => {
      const out = new CountingLog();
      let now = 1_000_000;
      const limiter = new LogLimiter(out.logger, { lines: 3, intervalMs: 10_000, now: () => now });
      for (let i = 0; i < 1000; i++)
        limiter.write("peer:x", 'from peer "x"', "warn", { peer: "x" }, `bad ${i}`);
      assert.equal(out.lines, 3);
      now += 10_000;
      limiter.sweep();
      assert.equal(out.lines, 4);
      const summary = out.kept[3]!;
      assert.equal(summary.msg, 'suppressed 997 similar lines from peer "x" in the last 10 s');
      assert.equal(summary.suppressed, 997);
      assert.equal(limiter.size, 0, "a key whose interval ended is forgotten");
      const bounded = new LogLimiter(out.logger, { maxKeys: 100, now: () => now });
      for (let i = 0; i < 10_000; i++) bounded.write(`peer:${i}`, `from ${i}`, "warn", {}, "one line");
      assert.equal(bounded.size, 100);
    });
  });

  describe("the work budget", () => {
    const log = new CountingLog();
    // A small budget, so that a test can exceed it without saturating the machine.
    const stack = useBrokerStack("flood_budget", "tcp", { logger: log.logger, peerMessagesPerSecond: 300 });
    before(() => stack.registerTemplate(ECHO));

    it("stops decoding a peer over its budget, drops it after 3 s of that, and serves an honest pool", async () => {
      await honestPool(stack, cleanups, "honest-budget");
      const peer = RawPeer.connect(stack.endpoint);
      cleanups.push(async () => peer.close());
      let sent = 0;
      const deadline = Date.now() + 15_000;
      // Valid requests, each of which the broker would answer: only the budget stops them.
      while (Date.now() < deadline && !peer.received.some((m) => m.command === "DISCONNECT")) {
        const batch: Promise<void>[] = [];
        for (let i = 0; i < 100; i++) batch.push(peer.send("POOLS", { request_id: `q${sent++}` }));
        await Promise.all(batch);
        await new Promise((r) => setTimeout(r, 20));
      }
      const bye = await peer.take("DISCONNECT", 5000);
      assert.equal(bye.body.code, "over_budget");
      const replies = peer.received.filter((m) => m.command === "REPLY").length;
      assert.ok(
        replies < sent,
        `${replies} replies to ${sent} requests: messages over the budget were dropped`,
      );
      const overLines = log.about(peer.id).filter((l) => l.code === "over_budget").length;
      assert.ok(overLines >= 1 && overLines <= 10, `${overLines} over-budget lines`);
      await echoCompletes(stack, 3);
    });
  });

  describe("client errors that tell the truth", () => {
    const MAX_BYTES = 64 * 1024;
    const stack = useBrokerStack("flood_client", "tcp", { maxMessageBytes: MAX_BYTES });
    const BIG_OUT = {
      namespace: "flood",
      name: "big",
      version: "1",
      steps: [{ name: "only", handler: "big" }],
    };
    before(async () => {
      await stack.registerTemplate(ECHO);
      await stack.registerTemplate(BIG_OUT);
    });

    it("answers an oversized SUBMIT with message_too_large and its request_id, first or last in the body", async () => {
      const peer = RawPeer.connect(stack.endpoint);
      cleanups.push(async () => peer.close());
      const context = { pad: "x".repeat(MAX_BYTES) };
      const template = { namespace: "flood", name: "echo" };
      await peer.sendJson("SUBMIT", { request_id: "first-1", template, context });
      await peer.sendJson("SUBMIT", { template, context, request_id: "last-1" });
      await peer.sendFrames(
        encodeMessage("SUBMIT", { request_id: "packed-1", template, context }, "msgpack"),
      );
      for (const id of ["first-1", "last-1", "packed-1"]) {
        const err = await peer.next("ERROR", 10_000);
        assert.equal(err.body.code, "message_too_large");
        assert.equal(err.body.request_id, id);
      }
      // A request_id buried in the middle of a large body is not searched for.
      await peer.sendJson("SUBMIT", {
        template,
        context: { a: "x".repeat(MAX_BYTES), request_id: "no", b: "y".repeat(2048) },
      });
      const err = await peer.next("ERROR", 10_000);
      assert.equal(err.body.code, "message_too_large");
      assert.equal(err.body.request_id, undefined);
    });

    it("makes the Node client report message_too_large, not 'no reply'", async () => {
      const client = new StepbrokerClient({ endpoint: stack.endpoint, requestTimeoutMs: 20_000 });
      cleanups.push(async () => client.close());
      const started = Date.now();
      await assert.rejects(
        client.submit({ namespace: "flood", name: "echo" }, { pad: "x".repeat(MAX_BYTES) }),
        (e: unknown) =>
          e instanceof BrokerError && e.code === "message_too_large" && /limit is 65536/.test(e.message),
      );
      assert.ok(Date.now() - started < 15_000, "answered, not timed out");
      // The same client goes on working.
      const { task } = await client.submit({ namespace: "flood", name: "echo" }, { small: true });
      assert.equal(task.state, "pending");
    });

    it("replaces a REPLY over max_message_bytes with reply_too_large; the task exists and smaller requests work", async () => {
      const pool = new HandlerPool({ endpoint: stack.endpoint, poolId: "big-outputs", logger: silent });
      // Output and context each under the limit, together over it.
      pool.handle("big", async () => ({ blob: "o".repeat(40 * 1024) }));
      pool.handle("echo", async (step) => ({ echoed: step.context }));
      await pool.start();
      cleanups.push(() => pool.close({ drainMs: 1000 }));
      const client = new StepbrokerClient({ endpoint: stack.endpoint, requestTimeoutMs: 20_000 });
      cleanups.push(async () => client.close());
      const { task } = await client.submit(
        { namespace: "flood", name: "big" },
        { blob: "c".repeat(40 * 1024) },
      );
      const done = await stack.waitForTask(task.task_id, 20_000);
      assert.equal(done.state, "complete");
      await assert.rejects(client.status(task.task_id), (e: unknown) => {
        assert.ok(e instanceof BrokerError, String(e));
        assert.equal(e.code, "reply_too_large");
        assert.match(e.message, new RegExp(`task ${task.task_id} is complete`));
        return true;
      });
      // Over a raw socket too: the ERROR carries the request_id.
      const peer = RawPeer.connect(stack.endpoint);
      cleanups.push(async () => peer.close());
      await peer.send("STATUS", { request_id: "big-status", task_id: task.task_id });
      const err = await peer.next("ERROR", 10_000);
      assert.equal(err.body.code, "reply_too_large");
      assert.equal(err.body.request_id, "big-status");
      // The task is still there, and a smaller request is answered.
      assert.equal((await stack.broker.status(task.task_id))?.state, "complete");
      const small = await client.submit({ namespace: "flood", name: "echo" }, { n: 4 });
      const waited = await client.wait(small.task.task_id, 20_000);
      assert.equal(waited.finished, true);
      assert.equal(waited.task.state, "complete");
    });
  });

  describe("the edge bomb", () => {
    const stack = useBrokerStack("flood_edges", "tcp");
    before(async () => {
      await stack.registerTemplate(ECHO);
      await stack.registerTemplate(templateAtEdgeLimit("bomb"));
    });

    it(`refuses a template of ${MAX_TEMPLATE_EDGES + 1} edges, submits one at ${MAX_TEMPLATE_EDGES} while an honest small task completes`, async () => {
      await assert.rejects(
        stack.sm.registerTemplate(templateAtEdgeLimit("over", 1)),
        (e: unknown) => e instanceof Error && e.message.includes(`the limit is ${MAX_TEMPLATE_EDGES}`),
      );
      await honestPool(stack, cleanups, "honest-edges");
      const client = new StepbrokerClient({ endpoint: stack.endpoint, requestTimeoutMs: 60_000 });
      cleanups.push(async () => client.close());
      const [bomb] = await Promise.all([
        client.submit({ namespace: "bomb", name: "bomb" }, {}),
        echoCompletes(stack, 5),
      ]);
      assert.equal(bomb.task.steps?.length, 1000);
    });

    it("ten concurrent bombs at the limit do not keep a small SUBMIT from completing within 20 s", async () => {
      await honestPool(stack, cleanups, "honest-edges-2");
      const client = new StepbrokerClient({ endpoint: stack.endpoint, requestTimeoutMs: 120_000 });
      cleanups.push(async () => client.close());
      // One socket sends in order: the small SUBMIT arrives right behind the ten bombs, while the
      // first of them is being created, however fast or slow the machine is.
      const bombs = Array.from({ length: 10 }, () => client.submit({ namespace: "bomb", name: "bomb" }, {}));
      const small = (async () => {
        const { task } = await client.submit({ namespace: "flood", name: "echo" }, { n: 6 });
        return client.wait(task.task_id, 20_000);
      })();
      const bound = new Promise<never>((_, reject) =>
        setTimeout(
          () => reject(new Error("the small task did not complete within 20 s of ten bombs")),
          20_000,
        ),
      );
      const out = await Promise.race([small, bound]);
      assert.equal(out.finished, true);
      assert.equal(out.task.state, "complete");
      const created = await Promise.all(bombs);
      assert.equal(new Set(created.map((c) => c.task.task_id)).size, 10);
      // Created in the statement after the one that was running when it arrived, beside a bomb:
      // had it queued behind them (as it did when statements took requests strictly in order), all
      // ten would be older. The replies say nothing of this: a bomb's 1,000-step view is slow to read.
      const before = created.filter((c) => Date.parse(c.task.created_at) < Date.parse(out.task.created_at));
      assert.ok(before.length <= 2, `the small task was created after ${before.length} of the 10 bombs`);
    });

    it("answers a SUBMIT of the refused template with unknown_template and its request_id", async () => {
      // A request for it is an honest unknown_template, with its request_id.
      const peer = RawPeer.connect(stack.endpoint);
      cleanups.push(async () => peer.close());
      const requestId = randomUUID();
      await peer.send("SUBMIT", {
        request_id: requestId,
        template: { namespace: "bomb", name: "over" },
        context: {},
      });
      const err = await peer.next("ERROR", 10_000);
      assert.equal(err.body.code, "unknown_template");
      assert.equal(err.body.request_id, requestId);
    });
  });
});
