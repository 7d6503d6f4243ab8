/**
 * The Node handler SDK against the protocol, with the test playing the broker
 * on a real ROUTER socket (see support/fakeBroker.ts). Every test binds its
 * own address, uses heartbeats of 50–100 ms so liveness paths stay quick,
 * waits for messages (never for wall-clock durations) and closes everything
 * in afterEach.
 */
import { strict as assert } from "node:assert";
import { pino } from "pino";
import { curveKeyPair } from "zeromq";
import {
  HandlerError,
  HandlerPool,
  PermanentError,
  RetryableError,
  StepAbortedError,
  permanent,
  retryAfter,
  type HandlerPoolOptions,
} from "../../handlers-node";
import { MAX_VALUE_DEPTH, valueProblem, type ResultItem } from "../../protocol";
import { FakeBroker, TRANSPORTS, sleep, stepFor, type Received } from "./support/fakeBroker";

const silent = pino({ level: "silent" });

function results(r: Received): ResultItem[] {
  return (r.body as { results: ResultItem[] }).results;
}

function deferred<T = void>(): { promise: Promise<T>; resolve: (v: T) => void } {
  let resolve!: (v: T) => void;
  const promise = new Promise<T>((r) => (resolve = r));
  return { promise, resolve };
}

for (const proto of TRANSPORTS) {
  describe(`handlers-node HandlerPool over ${proto}`, function () {
    let broker: FakeBroker;
    let pool: HandlerPool | undefined;

    beforeEach(async function () {
      broker = await FakeBroker.bind(proto);
    });

    afterEach(async function () {
      await pool?.close({ drainMs: 0, ackTimeoutMs: 0 });
      pool = undefined;
      broker.close();
    });

    function makePool(opts: Partial<HandlerPoolOptions> = {}): HandlerPool {
      pool = new HandlerPool({
        endpoint: broker.endpoint,
        logger: silent,
        heartbeat: { intervalMs: 50, liveness: 3 },
        reconnect: { initialMs: 10, maxMs: 50 },
        ...opts,
      });
      return pool;
    }

    it("says HELLO with pool id, handlers, capacity, encoding and sdk, and nothing else until WELCOME", async function () {
      const p = makePool({ poolId: "payments-1", capacity: 3, labels: { zone: "a" } });
      p.handle("process_payment", () => 1).handle("refund", () => 2);
      const started = p.start();
      const hello = await broker.next("HELLO");
      assert.equal(hello.identity, "payments-1", "routing id is the pool id");
      assert.equal(hello.encoding, "json");
      assert.deepEqual(hello.body, {
        pool_id: "payments-1",
        handlers: ["process_payment", "refund"],
        capacity: 3,
        encoding: "json",
        sdk: {
          language: "node",
          name: "stepbroker-handlers-node",
          version: hello.body.sdk && (hello.body.sdk as { version: string }).version,
        },
        running: [],
        session: hello.body.session,
        labels: { zone: "a" },
        trace_context: true,
      });
      assert.match(
        String(hello.body.session),
        /^[A-Za-z0-9_-]{22,128}$/,
        "a session secret of 22+ characters",
      );
      // No WELCOME: the pool must say HELLO again (on a fresh socket), and nothing else meanwhile.
      const again = await broker.next("HELLO");
      assert.equal(again.identity, "payments-1");
      assert.equal(again.body.session, hello.body.session, "the same session secret in every HELLO");
      assert.deepEqual(
        broker.log.map((r) => r.command),
        ["HELLO", "HELLO"],
        "only HELLO may be sent before WELCOME",
      );
      await broker.welcome(again.identity);
      await started; // start() resolves on WELCOME
      assert.equal(p.state, "started");
    });

    it("gives the handler the step's ids, context, config and inputs, and completes with its output", async function () {
      const p = makePool();
      let seen: unknown;
      p.handle<{ validate_order: { total: number } }, { order_id: string }, { currency: string }>(
        "process_payment",
        async (step, ctx) => {
          seen = { ...step, logIsPino: typeof ctx.log.info === "function", aborted: ctx.signal.aborted };
          return {
            charged: step.inputs.validate_order.total,
            currency: step.config.currency,
            order: step.context.order_id,
          };
        },
      );
      const started = p.start();
      const hello = await broker.handshake();
      await started;
      const s = stepFor("process_payment", {
        step_name: "pay",
        attempt: 2,
        max_attempts: 5,
        timeout_ms: 12_345,
        context: { order_id: "o-1" },
        config: { currency: "EUR" },
        inputs: { validate_order: { total: 42 }, nothing_here: null },
      });
      await broker.send(hello.identity, "STEP", { steps: [s] });
      const r = await broker.next("RESULT");
      assert.deepEqual(
        results(r).map(({ duration_ms: _d, ...rest }) => rest),
        [
          {
            attempt_id: s.attempt_id,
            status: "complete",
            output: { charged: 42, currency: "EUR", order: "o-1" },
          },
        ],
      );
      assert.equal(typeof results(r)[0]!.duration_ms, "number");
      assert.deepEqual(seen, {
        taskId: s.task_id,
        stepId: s.step_id,
        attemptId: s.attempt_id,
        stepName: "pay",
        handler: "process_payment",
        attempt: 2,
        maxAttempts: 5,
        timeoutMs: 12_345,
        template: s.template,
        context: { order_id: "o-1" },
        config: { currency: "EUR" },
        inputs: { validate_order: { total: 42 }, nothing_here: null },
        logIsPino: true,
        aborted: false,
      });
    });

    it("announces its capacity and never runs more at once, even when the broker sends more", async function () {
      const p = makePool({ capacity: 2 });
      let running = 0;
      let most = 0;
      p.handle("work", async () => {
        running++;
        most = Math.max(most, running);
        await sleep(5);
        running--;
        return running;
      });
      const started = p.start();
      const hello = await broker.handshake();
      await started;
      assert.equal(hello.body.capacity, 2);
      const steps = Array.from({ length: 6 }, () => stepFor("work"));
      await broker.send(hello.identity, "STEP", { steps }); // 6 > capacity: a misbehaving broker
      const done = new Set<string>();
      while (done.size < steps.length)
        for (const item of results(await broker.next("RESULT"))) done.add(item.attempt_id);
      assert.deepEqual([...done].sort(), steps.map((s) => s.attempt_id).sort());
      assert.ok(most <= 2, `ran ${most} at once with capacity 2`);
      assert.equal(most, 2, "uses its capacity");
    });

    it("batches results that finish in the same turn into one RESULT, and keeps them until ACK", async function () {
      const p = makePool({ capacity: 3 });
      p.handle("quick", (step) => step.attemptId);
      const started = p.start();
      const hello = await broker.handshake();
      await started;
      const steps = [stepFor("quick"), stepFor("quick"), stepFor("quick")];
      await broker.send(hello.identity, "STEP", { steps });
      const r = await broker.next("RESULT");
      assert.deepEqual(
        results(r)
          .map((i) => i.attempt_id)
          .sort(),
        steps.map((s) => s.attempt_id).sort(),
        "one RESULT carries all three",
      );
      // Acknowledge one; the broker then "restarts": hello_required -> HELLO lists the other two.
      await broker.send(hello.identity, "ACK", {
        acks: [{ attempt_id: steps[0]!.attempt_id, outcome: "stored" }],
      });
      await broker.send(hello.identity, "ERROR", { code: "hello_required", message: "who are you?" });
      const rehello = await broker.next("HELLO");
      assert.deepEqual(
        [...(rehello.body.running as string[])].sort(),
        [steps[1]!.attempt_id, steps[2]!.attempt_id].sort(),
        "running lists the unacknowledged attempts",
      );
      await broker.welcome(rehello.identity, { adopted: [] });
      const resent = await broker.next("RESULT");
      assert.deepEqual(
        results(resent)
          .map((i) => i.attempt_id)
          .sort(),
        [steps[1]!.attempt_id, steps[2]!.attempt_id].sort(),
      );
      const byId = (items: ResultItem[]): Map<string, ResultItem> =>
        new Map(items.map((i) => [i.attempt_id, i]));
      assert.deepEqual(
        byId(results(resent)),
        new Map([...byId(results(r))].filter(([k]) => k !== steps[0]!.attempt_id)),
        "the same results, unchanged",
      );
      await broker.send(hello.identity, "ACK", {
        acks: [
          { attempt_id: steps[1]!.attempt_id, outcome: "stored" },
          { attempt_id: steps[2]!.attempt_id, outcome: "stale" },
        ],
      });
      await broker.send(hello.identity, "ERROR", { code: "hello_required", message: "again" });
      const third = await broker.next("HELLO");
      assert.deepEqual(third.body.running, [], "acknowledged results are forgotten, whatever the outcome");
    });

    it("reconnects and says HELLO again, listing what it runs, when the broker falls silent", async function () {
      const p = makePool();
      const entered = deferred<AbortSignal>();
      p.handle("long", async (_step, ctx) => {
        entered.resolve(ctx.signal);
        await sleep(60_000, ctx.signal).catch(() => {});
        return "late";
      });
      const started = p.start();
      const hello = await broker.handshake({ heartbeat_ms: 50, heartbeat_liveness: 2 });
      await started;
      const s = stepFor("long");
      await broker.send(hello.identity, "STEP", { steps: [s] });
      const signal = await entered.promise;
      // The broker says nothing more. The pool heartbeats, then gives up on it.
      const hb = await broker.next("HEARTBEAT");
      // Every HEARTBEAT lists the cancelled handlers still running (none here): PROTOCOL.md, Zombie pools.
      assert.deepEqual(hb.body, { in_flight: 1, cancelling: [] });
      const rehello = await broker.next("HELLO");
      assert.deepEqual(rehello.body.running, [s.attempt_id]);
      // Adopted: it keeps running and its result still comes.
      await broker.welcome(rehello.identity, { adopted: [s.attempt_id] });
      await broker.next("HEARTBEAT", (m) => m.body.in_flight === 1);
      assert.equal(signal.aborted, false, "an adopted attempt keeps running");
    });

    it("aborts a running attempt that the broker did not adopt after a reconnect", async function () {
      const p = makePool();
      const aborted = deferred<string>();
      p.handle("long", async (_step, ctx) => {
        await sleep(60_000, ctx.signal).catch((e: StepAbortedError) => aborted.resolve(e.code));
        return null;
      });
      const started = p.start();
      const hello = await broker.handshake();
      await started;
      const s = stepFor("long");
      await broker.send(hello.identity, "STEP", { steps: [s] });
      await broker.send(hello.identity, "DISCONNECT", { code: "shutting_down", reason: "restarting" });
      const rehello = await broker.next("HELLO");
      assert.deepEqual(rehello.body.running, [s.attempt_id]);
      await broker.welcome(rehello.identity, { adopted: [] });
      assert.equal(await aborted.promise, "not_adopted");
      await broker.send(rehello.identity, "ERROR", { code: "hello_required", message: "x" });
      assert.deepEqual(
        (await broker.next("HELLO")).body.running,
        [],
        "a dropped attempt is not listed any more",
      );
    });

    it("aborts the signal on CANCEL and drops that attempt's outcome", async function () {
      const p = makePool({ capacity: 2 });
      const reason = deferred<unknown>();
      const entered = deferred();
      p.handle("cancellable", async (_step, ctx) => {
        entered.resolve();
        await new Promise<void>((resolve) =>
          ctx.signal.addEventListener("abort", () => resolve(), { once: true }),
        );
        reason.resolve(ctx.signal.reason);
        return "finished anyway";
      });
      p.handle("quick", () => "ok");
      const started = p.start();
      const hello = await broker.handshake();
      await started;
      const s = stepFor("cancellable");
      await broker.send(hello.identity, "STEP", { steps: [s] });
      await entered.promise;
      await broker.send(hello.identity, "CANCEL", {
        cancels: [{ attempt_id: s.attempt_id, reason: "task_cancelled" }],
      });
      const why = await reason.promise;
      assert.ok(why instanceof StepAbortedError);
      assert.equal(why.code, "task_cancelled");
      assert.equal(why.name, "AbortError");
      const q = stepFor("quick");
      await broker.send(hello.identity, "STEP", { steps: [q] });
      const r = await broker.next("RESULT");
      assert.deepEqual(
        results(r).map((i) => i.attempt_id),
        [q.attempt_id],
        "the cancelled attempt sends no result",
      );
      assert.equal(broker.peek().filter((m) => m.command === "RESULT").length, 0);
    });

    it("gives a handler that reads its signal only after a CANCEL a signal already aborted, and a logger with the attempt's ids", async function () {
      // The pool makes the AbortController and the child logger on first read: an abort that comes
      // first must still reach the handler, with its reason.
      const p = makePool({ capacity: 2 });
      const gate = deferred();
      const seen = deferred<{ aborted: boolean; reason: unknown; bindings: Record<string, unknown> }>();
      p.handle("late_reader", async (_step, ctx) => {
        await gate.promise;
        seen.resolve({
          aborted: ctx.signal.aborted,
          reason: ctx.signal.reason,
          bindings: ctx.log.bindings(),
        });
        return "finished anyway";
      });
      p.handle("quick", () => "ok");
      const started = p.start();
      const hello = await broker.handshake();
      await started;
      const s = stepFor("late_reader");
      await broker.send(hello.identity, "STEP", { steps: [s] });
      await broker.send(hello.identity, "CANCEL", {
        cancels: [{ attempt_id: s.attempt_id, reason: "task_cancelled" }],
      });
      // one socket, in order: once this answer is back, the pool has read the CANCEL
      const q = stepFor("quick");
      await broker.send(hello.identity, "STEP", { steps: [q] });
      assert.deepEqual(
        results(await broker.next("RESULT")).map((i) => i.attempt_id),
        [q.attempt_id],
      );
      gate.resolve();
      const got = await seen.promise;
      assert.equal(got.aborted, true);
      assert.ok(got.reason instanceof StepAbortedError);
      assert.equal(got.reason.code, "task_cancelled");
      assert.equal(got.bindings.attempt_id, s.attempt_id);
      assert.equal(got.bindings.step_id, s.step_id);
      assert.equal(got.bindings.task_id, s.task_id);
      assert.equal(got.bindings.step, s.step_name);
      // its handler has returned: the next RESULT holds only the next step's, the cancelled outcome is dropped
      const q2 = stepFor("quick");
      await broker.send(hello.identity, "STEP", { steps: [q2] });
      assert.deepEqual(
        results(await broker.next("RESULT")).map((i) => i.attempt_id),
        [q2.attempt_id],
        "the cancelled attempt sends no result",
      );
    });

    it("reports thrown errors with type, message and retry hints, never a stack", async function () {
      const p = makePool({ capacity: 8 });
      p.handle("perm", () => {
        throw new PermanentError("card declined", { code: "CardDeclined", details: { last4: "4242" } });
      });
      p.handle("perm_helper", () => {
        throw permanent("no such customer");
      });
      p.handle("retry", () => {
        throw new RetryableError("rate limited", { retryAfterMs: 1500 });
      });
      p.handle("retry_helper", () => {
        throw retryAfter(250, "busy");
      });
      p.handle("coded", async () => {
        throw Object.assign(new Error("socket hang up"), { code: "ECONNRESET" });
      });
      p.handle("plain", () => {
        throw new TypeError("x is not a function");
      });
      p.handle("string", () => {
        throw "just a string";
      });
      p.handle("void", () => undefined);
      const started = p.start();
      const hello = await broker.handshake();
      await started;
      const names = [
        "perm",
        "perm_helper",
        "retry",
        "retry_helper",
        "coded",
        "plain",
        "string",
        "void",
        "missing",
      ];
      const steps = names.map((n) => stepFor(n));
      await broker.send(hello.identity, "STEP", { steps });
      const byAttempt = new Map<string, ResultItem>();
      while (byAttempt.size < steps.length)
        for (const i of results(await broker.next("RESULT"))) byAttempt.set(i.attempt_id, i);
      const of = (n: string): Omit<ResultItem, "duration_ms"> => {
        const { duration_ms: _d, ...rest } = byAttempt.get(steps[names.indexOf(n)]!.attempt_id)!;
        return rest;
      };
      const id = (n: string): string => steps[names.indexOf(n)]!.attempt_id;
      assert.deepEqual(of("perm"), {
        attempt_id: id("perm"),
        status: "error",
        error: {
          type: "CardDeclined",
          message: "card declined",
          retryable: false,
          details: { last4: "4242" },
        },
      });
      assert.deepEqual(of("perm_helper").error, {
        type: "PermanentError",
        message: "no such customer",
        retryable: false,
      });
      assert.deepEqual(of("retry").error, {
        type: "RetryableError",
        message: "rate limited",
        retryable: true,
        retry_after_ms: 1500,
      });
      assert.deepEqual(of("retry_helper").error, {
        type: "RetryableError",
        message: "busy",
        retryable: true,
        retry_after_ms: 250,
      });
      assert.deepEqual(of("coded").error, { type: "ECONNRESET", message: "socket hang up", retryable: true });
      assert.deepEqual(of("plain").error, {
        type: "TypeError",
        message: "x is not a function",
        retryable: true,
      });
      assert.deepEqual(of("string").error, { type: "Error", message: "just a string", retryable: true });
      assert.deepEqual(
        of("void"),
        { attempt_id: id("void"), status: "complete", output: null },
        "undefined output becomes null",
      );
      const missing = of("missing");
      assert.equal(missing.status, "error");
      assert.equal(missing.error?.type, "unknown_handler");
      assert.equal(missing.error?.retryable, true);
      for (const item of byAttempt.values()) {
        assert.ok(!JSON.stringify(item).includes("    at "), "no stack trace crosses the wire");
      }
    });

    it("sends PROGRESS for a long step", async function () {
      const p = makePool();
      p.handle("long", async (_step, ctx) => {
        ctx.progress(0.25, "a quarter");
        ctx.progress(0.5, "half"); // same turn: coalesced, the last one wins
        await sleep(5);
        ctx.progress(7); // clamped to 1
        await sleep(5);
        return "done";
      });
      const started = p.start();
      const hello = await broker.handshake();
      await started;
      const s = stepFor("long");
      await broker.send(hello.identity, "STEP", { steps: [s] });
      const first = await broker.next("PROGRESS");
      assert.deepEqual(first.body, {
        progress: [{ attempt_id: s.attempt_id, fraction: 0.5, message: "half" }],
      });
      const second = await broker.next("PROGRESS");
      assert.deepEqual(second.body, { progress: [{ attempt_id: s.attempt_id, fraction: 1 }] });
      await broker.next("RESULT");
    });

    it("uses MessagePack after a WELCOME that confirms it (HELLO stays JSON)", async function () {
      const p = makePool({ encoding: "msgpack" });
      p.handle("echo", (step) => ({ got: step.inputs }));
      const started = p.start();
      const hello = await broker.next("HELLO");
      assert.equal(hello.encoding, "json");
      assert.equal(hello.body.encoding, "msgpack");
      await broker.welcome(hello.identity, { encoding: "msgpack", heartbeat_ms: 50 });
      await started;
      const s = stepFor("echo", { inputs: { a: { n: 1.5, list: [1, "two", null, true] } } });
      await broker.send(hello.identity, "STEP", { steps: [s] }, "msgpack");
      const r = await broker.next("RESULT");
      assert.equal(r.encoding, "msgpack");
      assert.deepEqual(results(r)[0]!.output, { got: { a: { n: 1.5, list: [1, "two", null, true] } } });
      const hb = await broker.next("HEARTBEAT");
      assert.equal(hb.encoding, "msgpack");
      // A JSON STEP is still understood: receivers accept both at any time.
      const j = stepFor("echo");
      await broker.send(hello.identity, "STEP", { steps: [j] }, "json");
      assert.equal((await broker.next("RESULT")).encoding, "msgpack");
    });

    it("reports an output the broker would refuse (U+0000, a lone surrogate, 57 levels) as invalid_output", async function () {
      const p = makePool();
      const outputs: Record<string, unknown> = {
        nul: { a: ["x\u0000"] },
        surrogate: { s: "\ud800" },
        deep: Array.from({ length: 57 }).reduce<unknown>((v) => [v], 1),
        fine: { emoji: "\ud83d\ude00", deep: Array.from({ length: 54 }).reduce<unknown>((v) => [v], 1) },
      };
      for (const [name, out] of Object.entries(outputs)) p.handle(name, () => out);
      const started = p.start();
      const hello = await broker.handshake();
      await started;
      const expected: Record<string, RegExp | undefined> = {
        nul: /at \/a\/0, a string holds U\+0000/,
        surrogate: /at \/s, a string holds an unpaired surrogate/,
        deep: /nesting deeper than 56 levels/,
        fine: undefined,
      };
      for (const name of Object.keys(outputs)) {
        const s = stepFor(name);
        await broker.send(hello.identity, "STEP", { steps: [s] });
        const [item] = results(await broker.next("RESULT"));
        const want = expected[name];
        if (!want) {
          assert.equal(item!.status, "complete", `${name}: ${JSON.stringify(item!.error)}`);
          assert.deepEqual(item!.output, outputs[name]);
          continue;
        }
        // Sent as the step's error, which the broker stores, instead of a result it refuses and the pool resends forever.
        assert.equal(item!.status, "error", name);
        assert.equal(item!.error!.type, "invalid_output", name);
        assert.equal(item!.error!.retryable, false, name);
        assert.match(item!.error!.message, want, name);
      }
    });

    it("sends a thrown error whose message holds U+0000 or a lone surrogate, with U+FFFD in their place", async function () {
      const p = makePool();
      p.handle("nul", () => {
        throw new HandlerError("bad \u0000 byte \udc00", { code: "nul_error", details: { raw: "a\u0000b" } });
      });
      // 8191 "a" then an emoji: the cut at 8192 splits the pair and leaves a lone high surrogate.
      p.handle("cut", () => {
        throw new Error(`${"a".repeat(8191)}\ud83d\ude00 end`);
      });
      const started = p.start();
      const hello = await broker.handshake();
      await started;
      const nul = stepFor("nul");
      await broker.send(hello.identity, "STEP", { steps: [nul] });
      const [n] = results(await broker.next("RESULT"));
      assert.equal(n!.status, "error");
      assert.equal(n!.error!.type, "nul_error");
      assert.equal(n!.error!.message, "bad \ufffd byte \ufffd");
      assert.equal(n!.error!.retryable, true);
      // Details the broker would refuse are dropped rather than the whole error.
      assert.equal(n!.error!.details, undefined);
      const cut = stepFor("cut");
      await broker.send(hello.identity, "STEP", { steps: [cut] });
      const [c] = results(await broker.next("RESULT"));
      assert.equal(c!.error!.message, `${"a".repeat(8191)}\ufffd`);
      assert.equal(valueProblem(c!.error, MAX_VALUE_DEPTH), undefined);
    });

    it("answers bad messages from the broker with ERROR, never an ERROR to an ERROR, and keeps working", async function () {
      const p = makePool();
      p.handle("ok", () => "fine");
      const started = p.start();
      const hello = await broker.handshake();
      await started;
      const id = hello.identity;
      const bad: [string, (Buffer | string)[]][] = [
        ["malformed_frame", ["stepbroker/1", "STEP"]],
        ["malformed_frame", ["zmtp/9", "STEP", "{}"]],
        ["unsupported_version", ["stepbroker/2", "STEP", "{}"]],
        ["unknown_command", ["stepbroker/1", "SUBMIT", "{}"]],
        ["unknown_command", ["stepbroker/1", "FROBNICATE", "{}"]],
        ["undecodable_body", ["stepbroker/1", "STEP", "not json"]],
        ["undecodable_body", ["stepbroker/1", "ACK", '{"acks": [']],
        ["schema_violation", ["stepbroker/1", "STEP", JSON.stringify({ steps: [{ attempt_id: "nope" }] })]],
        [
          "schema_violation",
          [
            "stepbroker/1",
            "STEP",
            JSON.stringify({
              steps: [
                { ...stepFor("ok"), attempt_id: "6a1f0c1e-3b7d-4c2a-9f4e-1d2c3b4a5f60", task_id: undefined },
              ],
            }),
          ],
        ],
      ];
      for (const [code, frames] of bad) {
        await broker.sendRaw(id, frames);
        const err = await broker.next("ERROR");
        assert.equal(err.body.code, code, `answer to ${frames.map(String).join(" | ")}`);
        assert.ok(typeof err.body.message === "string" && !String(err.body.message).includes("    at "));
      }
      const errors = broker.log.filter((r) => r.command === "ERROR");
      assert.equal(errors.at(-2)!.body.command, "STEP");
      assert.equal(errors.at(-2)!.body.instance_path, "/steps/0");
      assert.equal(errors.at(-2)!.body.attempt_id, undefined, "no readable attempt id");
      assert.equal(
        errors.at(-1)!.body.attempt_id,
        "6a1f0c1e-3b7d-4c2a-9f4e-1d2c3b4a5f60",
        "names the attempt of the bad item",
      );
      // An invalid ERROR and a valid ERROR get no reply.
      await broker.sendRaw(id, ["stepbroker/1", "ERROR", '{"code": 5}']);
      await broker.send(id, "ERROR", { code: "internal_error", message: "oops" });
      const s = stepFor("ok");
      await broker.send(id, "STEP", { steps: [s] });
      assert.deepEqual(
        results(await broker.next("RESULT")).map((i) => i.attempt_id),
        [s.attempt_id],
      );
      assert.equal(
        broker.log.filter((r) => r.command === "ERROR").length,
        bad.length,
        "no reply to an ERROR",
      );
    });

    it("close() hands back waiting steps, drains, aborts and hands back the rest, then closes", async function () {
      const p = makePool({ capacity: 2 });
      const abortedWith = deferred<string>();
      const release = deferred();
      p.handle("stubborn", async (_step, ctx) => {
        await sleep(60_000, ctx.signal).catch((e: StepAbortedError) => abortedWith.resolve(e.code));
        return "too late";
      });
      p.handle("finishing", async () => {
        await release.promise;
        return "finished during drain";
      });
      p.handle("waiting", () => "never runs");
      const started = p.start();
      // This fake broker sends no heartbeats: a long liveness keeps the pool from leaving it during the drain.
      const hello = await broker.handshake({ heartbeat_liveness: 100 });
      await started;
      const stubborn = stepFor("stubborn");
      const finishing = stepFor("finishing");
      const waiting = stepFor("waiting");
      await broker.send(hello.identity, "STEP", { steps: [stubborn, finishing, waiting] });
      await broker.next("HEARTBEAT", (m) => m.body.in_flight === 3); // the STEP has been read
      const closed = p.close({ drainMs: 1000, ackTimeoutMs: 2000 });
      const first = await broker.next("DISCONNECT");
      assert.deepEqual(
        first.body.handed_back,
        [waiting.attempt_id],
        "steps not started are handed back first",
      );
      release.resolve();
      const r = await broker.next("RESULT");
      assert.deepEqual(
        results(r).map((i) => i.attempt_id),
        [finishing.attempt_id],
      );
      const second = await broker.next("DISCONNECT");
      assert.deepEqual(
        second.body.handed_back,
        [stubborn.attempt_id],
        "after drainMs the rest is aborted and handed back",
      );
      assert.equal(await abortedWith.promise, "pool_closing");
      await broker.send(hello.identity, "ACK", {
        acks: [{ attempt_id: finishing.attempt_id, outcome: "stored" }],
      });
      await closed;
      assert.equal(p.state, "closed");
      assert.equal(
        broker.log.filter((m) => m.command === "RESULT").length,
        1,
        "the aborted step's outcome is not sent",
      );
    });

    it("reconnects on ERROR shutting_down and on DISCONNECT, keeping unacknowledged results", async function () {
      const p = makePool();
      p.handle("quick", () => "ok");
      const started = p.start();
      const hello = await broker.handshake();
      await started;
      const s = stepFor("quick");
      await broker.send(hello.identity, "STEP", { steps: [s] });
      const first = await broker.next("RESULT");
      await broker.send(hello.identity, "ERROR", { code: "shutting_down", message: "bye" });
      const h2 = await broker.next("HELLO");
      assert.deepEqual(h2.body.running, [s.attempt_id]);
      await broker.welcome(h2.identity);
      assert.deepEqual(results(await broker.next("RESULT")), results(first), "resent after WELCOME");
      await broker.send(h2.identity, "DISCONNECT", { code: "too_many_errors", reason: "go away" });
      const h3 = await broker.next("HELLO");
      assert.deepEqual(h3.body.running, [s.attempt_id]);
    });

    it("rejects start() when the broker rejects HELLO", async function () {
      const p = makePool();
      p.handle("x", () => 1);
      const started = p.start();
      const hello = await broker.next("HELLO");
      await broker.send(hello.identity, "ERROR", {
        code: "hello_rejected",
        message: "handler x is not allowed here",
      });
      await assert.rejects(
        started,
        (e: Error & { code?: string }) => e.code === "hello_rejected" && /not allowed/.test(e.message),
      );
    });

    it("close() before any WELCOME rejects start() and sends nothing but HELLO", async function () {
      const p = makePool();
      p.handle("x", () => 1);
      const started = p.start();
      await broker.next("HELLO");
      await p.close({ drainMs: 0 });
      await assert.rejects(started, /closed before a broker welcomed/);
      assert.ok(broker.log.every((m) => m.command === "HELLO"));
    });
  });
}

describe("handlers-node HandlerPool options", function () {
  it("refuses bad options and late registration", async function () {
    assert.throws(() => new HandlerPool({ logger: silent }), /endpoint/);
    assert.throws(() => new HandlerPool({ endpoint: "inproc://x", capacity: 0, logger: silent }), /capacity/);
    const p = new HandlerPool({ endpoint: "inproc://nowhere-options", logger: silent });
    assert.throws(() => p.handle("bad name!", () => 1), /must match/);
    p.handle("ok", () => 1);
    assert.throws(() => p.handle("ok", () => 1), /already registered/);
    await p.start({ waitForWelcome: false });
    assert.throws(() => p.handle("late", () => 1), /before start/);
    await p.close({ drainMs: 0 });
  });

  it("makes a default pool id from host, pid and a random suffix", function () {
    const a = new HandlerPool({ endpoint: "inproc://x", logger: silent });
    const b = new HandlerPool({ endpoint: "inproc://x", logger: silent });
    assert.match(a.poolId, new RegExp(`-${process.pid}-[0-9a-f]{6}$`));
    assert.notEqual(a.poolId, b.poolId);
  });
});

describe("handlers-node HandlerPool with several brokers and CURVE", function () {
  const brokers: FakeBroker[] = [];
  let pool: HandlerPool | undefined;

  afterEach(async function () {
    await pool?.close({ drainMs: 0, ackTimeoutMs: 0 });
    pool = undefined;
    for (const b of brokers.splice(0)) b.close();
  });

  it("keeps one session per endpoint and answers each broker on its own socket", async function () {
    const a = await FakeBroker.bind("ipc");
    const b = await FakeBroker.bind("tcp");
    brokers.push(a, b);
    pool = new HandlerPool({
      endpoints: [a.endpoint, b.endpoint],
      poolId: "multi",
      capacity: 2,
      logger: silent,
    });
    pool.handle("echo", (step) => step.context);
    const started = pool.start();
    await Promise.all([a.handshake(), b.handshake()]);
    await started;
    const sa = stepFor("echo", { context: { from: "a" } });
    const sb = stepFor("echo", { context: { from: "b" } });
    await a.send("multi", "STEP", { steps: [sa] });
    await b.send("multi", "STEP", { steps: [sb] });
    assert.deepEqual(
      results(await a.next("RESULT")).map((i) => i.output),
      [{ from: "a" }],
    );
    assert.deepEqual(
      results(await b.next("RESULT")).map((i) => i.output),
      [{ from: "b" }],
    );
    // Only b restarts: only b hears a HELLO, listing only b's unacknowledged attempt.
    await b.send("multi", "ERROR", { code: "hello_required", message: "restarted" });
    assert.deepEqual((await b.next("HELLO")).body.running, [sb.attempt_id]);
    assert.equal(a.peek().filter((m) => m.command === "HELLO").length, 0);
  });

  it("runs 2000 steps sent in batches of 64, answering each attempt exactly once", async function () {
    const b = await FakeBroker.bind("tcp");
    brokers.push(b);
    pool = new HandlerPool({ endpoint: b.endpoint, poolId: "busy", capacity: 64, logger: silent });
    pool.handle("double", async (step) => (step.context as { n: number }).n * 2);
    const started = pool.start();
    await b.handshake({ heartbeat_liveness: 100 });
    await started;
    const steps = Array.from({ length: 2000 }, (_, n) => stepFor("double", { context: { n } }));
    const seen = new Map<string, unknown>();
    let sent = 0;
    while (seen.size < steps.length) {
      // Keep at most `capacity` in flight, as a broker does.
      while (sent < steps.length && sent - seen.size < 64) {
        const batch = steps.slice(sent, Math.min(sent + 64 - (sent - seen.size), steps.length));
        sent += batch.length;
        await b.send("busy", "STEP", { steps: batch });
      }
      const r = await b.next("RESULT");
      for (const i of results(r)) {
        assert.ok(!seen.has(i.attempt_id), "each attempt answered once");
        seen.set(i.attempt_id, i.output);
      }
      await b.send("busy", "ACK", {
        acks: results(r).map((i) => ({ attempt_id: i.attempt_id, outcome: "stored" as const })),
      });
    }
    steps.forEach((s, n) => assert.equal(seen.get(s.attempt_id), n * 2));
    assert.ok(b.log.filter((m) => m.command === "RESULT").length < steps.length, "results were batched");
  });

  it("connects over CURVE with the broker's public key and its own key pair", async function () {
    const server = curveKeyPair();
    const client = curveKeyPair();
    const b = await FakeBroker.bind("tcp", { curveServer: true, curveSecretKey: server.secretKey });
    brokers.push(b);
    pool = new HandlerPool({
      endpoint: b.endpoint,
      poolId: "curvy",
      logger: silent,
      curve: { serverPublicKey: server.publicKey, publicKey: client.publicKey, secretKey: client.secretKey },
    });
    pool.handle("echo", () => "secret");
    const started = pool.start();
    await b.handshake();
    await started;
    const s = stepFor("echo");
    await b.send("curvy", "STEP", { steps: [s] });
    assert.deepEqual(
      results(await b.next("RESULT")).map((i) => i.output),
      ["secret"],
    );
  });
});
