/**
 * What the broker does when things go wrong, with real processes, a real
 * PostgreSQL and TCP on loopback: pools killed mid-step, a broker killed while
 * a pool holds a result, steps that time out, tasks cancelled mid-run,
 * handlers that throw, and a pool that goes silent without closing its socket.
 *
 * Each test uses handler names of its own, so a step left over from one test
 * is never dispatched to another test's pool.
 */
import { strict as assert } from "node:assert";
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pino, type Logger } from "pino";
import { Dealer } from "zeromq";
import { HandlerPool, SDK_VERSION, StepAbortedError, type Step, type StepContext } from "../../handlers-node";
import {
  decodeMessage,
  encodeMessage,
  type BodyOf,
  type CommandName,
  type StepDispatch,
  type TaskView,
} from "../../protocol";
import type { AttemptRecord } from "../../broker/state/types";
import type { StateManager } from "../../broker/state/StateManager";
import { freeTcpEndpoint, spawnBrokerProcess, type BrokerProcess } from "../support/brokerProcess";
import { useStateManager } from "../support/db";
import { assertInvariants } from "../support/invariants";
import { eventually, silent, spawnNodePool, stepOf, useBrokerStack, type ChildPool } from "../support/stack";

const NS = "faults";

function uid(): string {
  return randomBytes(3).toString("hex");
}

/** A one-step template (or several steps, given as they are). */
function template(name: string, steps: Record<string, unknown>[]): Record<string, unknown> {
  return { namespace: NS, name, version: "1", steps };
}

/** Polls the task (with its steps) until it reaches one of `states`. */
async function taskIn(
  sm: StateManager,
  taskId: string,
  states: string[],
  timeoutMs = 20_000,
): Promise<TaskView> {
  return eventually(
    `task ${taskId} to be ${states.join(" or ")}`,
    async () => {
      const t = await sm.getTask(taskId, { includeSteps: true });
      return t && states.includes(t.state) ? t : undefined;
    },
    timeoutMs,
  );
}

function outcomes(attempts: AttemptRecord[]): (string | null)[] {
  return attempts.map((a) => a.outcome);
}

/** A deferred: a promise and the function that settles it. */
function gate(): { promise: Promise<void>; open: () => void } {
  let open!: () => void;
  const promise = new Promise<void>((r) => (open = r));
  return { promise, open };
}

function untilAborted(signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    signal.addEventListener("abort", () => resolve(), { once: true });
  });
}

interface Incoming {
  command: string;
  body: Record<string, unknown>;
}

/**
 * A pool with no SDK in between: a bare DEALER that sends exactly what a test
 * tells it to and keeps everything the broker sends, so a test can play a
 * pool that misbehaves (goes silent, answers late) and see the broker's side.
 */
class RawPool {
  readonly socket: Dealer;
  private readonly inbox: Incoming[] = [];
  private wake: (() => void) | undefined;
  /** zeromq.js allows one pending send per socket: each send waits for the previous one. */
  private sending: Promise<void> = Promise.resolve();
  private beat: NodeJS.Timeout | undefined;

  constructor(
    readonly poolId: string,
    endpoint: string,
  ) {
    this.socket = new Dealer({ routingId: poolId, linger: 0 });
    this.socket.connect(endpoint);
    void this.read();
  }

  private async read(): Promise<void> {
    try {
      for await (const frames of this.socket) {
        const d = decodeMessage(frames);
        if (d.ok)
          this.inbox.push({
            command: d.message.command,
            body: d.message.body as unknown as Record<string, unknown>,
          });
        this.wake?.();
      }
    } catch {
      // closed
    }
  }

  send<C extends CommandName>(command: C, body: BodyOf<C>): Promise<void> {
    const p = this.sending.then(() => this.socket.send(encodeMessage(command, body)));
    this.sending = p.catch(() => undefined);
    return p;
  }

  /** HELLO, then the WELCOME that answers it. */
  async hello(handlers: string[], capacity = 1): Promise<Record<string, unknown>> {
    await this.send("HELLO", {
      pool_id: this.poolId,
      handlers,
      capacity,
      sdk: { language: "node", name: "raw-test-pool", version: SDK_VERSION },
    });
    return this.next("WELCOME");
  }

  /** Heartbeats every `ms` until stopped: a pool that is alive but never answers its steps. */
  heartbeatEvery(ms: number): void {
    this.beat = setInterval(() => void this.send("HEARTBEAT", {}).catch(() => undefined), ms);
  }

  /** The next message with this command (and matching `match`), taken out of the inbox. */
  async next(
    command: string,
    match: (body: Record<string, unknown>) => boolean = () => true,
    timeoutMs = 10_000,
  ): Promise<Record<string, unknown>> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const i = this.inbox.findIndex((m) => m.command === command && match(m.body));
      if (i >= 0) return this.inbox.splice(i, 1)[0]!.body;
      if (Date.now() > deadline) {
        throw new Error(
          `${this.poolId}: no ${command} within ${timeoutMs} ms; got ${this.inbox.map((m) => m.command).join(", ") || "nothing"}`,
        );
      }
      await new Promise<void>((r) => {
        const t = setTimeout(r, 50);
        this.wake = () => {
          clearTimeout(t);
          r();
        };
      });
    }
  }

  async nextSteps(): Promise<StepDispatch[]> {
    return (await this.next("STEP")).steps as StepDispatch[];
  }

  close(): void {
    clearInterval(this.beat);
    this.socket.close();
  }
}

describe("broker faults (in-process broker, pools over tcp://127.0.0.1)", function () {
  this.timeout(60_000);
  const stack = useBrokerStack("faults", "tcp");
  const cleanups: (() => Promise<void> | void)[] = [];
  let tmp: string;

  before(() => {
    tmp = mkdtempSync(join(tmpdir(), "sb-faults-"));
  });
  after(() => rmSync(tmp, { recursive: true, force: true }));
  afterEach(async function () {
    this.timeout(30_000);
    while (cleanups.length) await cleanups.pop()!();
    // Whatever the fault, the history it left is whole (DESIGN.md, "History is insert-only").
    await assertInvariants(stack);
  });

  async function nodePool(handlers: string, capacity = 1, extra: string[] = []): Promise<ChildPool> {
    const p = await spawnNodePool(stack.endpoint, [
      "--handlers",
      handlers,
      "--capacity",
      String(capacity),
      "--pool-id",
      `p-${uid()}`,
      "--drain-ms",
      "200",
      ...extra,
    ]);
    cleanups.push(() => p.stop());
    return p;
  }

  async function inProcessPool(setup: (p: HandlerPool) => void, capacity = 1): Promise<HandlerPool> {
    const p = new HandlerPool({
      endpoint: stack.endpoint,
      capacity,
      poolId: `inproc-${uid()}`,
      logger: silent,
    });
    setup(p);
    await p.start();
    cleanups.push(() => p.close({ drainMs: 200, ackTimeoutMs: 500 }));
    return p;
  }

  function rawPool(): RawPool {
    const p = new RawPool(`raw-${uid()}`, stack.endpoint);
    cleanups.push(() => p.close());
    return p;
  }

  async function register(def: Record<string, unknown>): Promise<void> {
    await stack.registerTemplate(def);
  }

  describe("a pool killed mid-step", () => {
    it("runs the step again on another pool and stores exactly one result", async () => {
      await register(template("pool_dies", [{ name: "work", handler: "pd_work", timeout_ms: 60_000 }]));
      // The first pool sleeps (for a minute), the second answers at once.
      const doomed = await nodePool("pd_work=sleep");
      const { task } = await stack.broker.submit({
        namespace: NS,
        name: "pool_dies",
        context: { sleep_ms: 60_000 },
      });
      await eventually("the step to be in flight at the first pool", () =>
        stack.broker.listPools().find((p) => p.pool_id === doomed.poolId && p.in_flight === 1),
      );
      // In this process (see the silent pool below): a second pool process, starved right after its
      // WELCOME on a loaded machine, was purged too and made a third attempt; it also cost a spawn.
      const healthy = await inProcessPool((p) =>
        p.handle("pd_work", (step: Step) => ({ step: { attempt: step.attempt } })),
      );
      await doomed.kill9();

      const done = await stack.waitForTask(task.task_id);
      assert.equal(done.state, "complete");
      const step = stepOf(done, "work");
      assert.equal(step.attempts, 2, "the killed attempt counts");
      assert.equal((step.output as { step: { attempt: number } }).step.attempt, 2);
      const attempts = await stack.sm.getAttempts(task.task_id);
      assert.deepEqual(outcomes(attempts), ["lost", "complete"]);
      assert.equal(attempts[0]!.poolId, doomed.poolId, "the lost attempt names the pool that died");
      assert.equal(attempts[1]!.poolId, healthy.poolId, "the second attempt ran on the healthy pool");
    });
  });

  describe("a step that times out", () => {
    it("ends each attempt as a timeout and fails the task naming the step when attempts run out", async () => {
      await register(
        template("times_out", [
          {
            name: "stuck",
            handler: "to_hang",
            timeout_ms: 300,
            retry: { max_attempts: 2, backoff: { initial_ms: 20, jitter: 0 } },
          },
        ]),
      );
      // hang ignores its signal and keeps its slot: capacity 2 leaves room for the second attempt.
      await nodePool("to_hang=hang", 2);
      const { task } = await stack.broker.submit({ namespace: NS, name: "times_out", context: {} });

      const done = await stack.waitForTask(task.task_id);
      assert.equal(done.state, "error");
      assert.deepEqual(done.error?.failed_steps, ["stuck"]);
      const step = stepOf(done, "stuck");
      assert.equal(step.state, "error");
      assert.equal(step.attempts, 2);
      assert.deepEqual(outcomes(await stack.sm.getAttempts(task.task_id)), ["timeout", "timeout"]);
    });

    it("sends CANCEL with reason timeout to the pool holding each timed-out attempt", async () => {
      await register(
        template("times_out_raw", [
          {
            name: "stuck",
            handler: "to_raw",
            timeout_ms: 300,
            retry: { max_attempts: 2, backoff: { initial_ms: 20, jitter: 0 } },
          },
        ]),
      );
      const raw = rawPool();
      await raw.hello(["to_raw"]);
      raw.heartbeatEvery(50); // alive, but never answers its steps
      const { task } = await stack.broker.submit({ namespace: NS, name: "times_out_raw", context: {} });

      for (const attempt of [1, 2]) {
        const [s] = await raw.nextSteps();
        assert.equal(s!.attempt, attempt);
        const cancel = await raw.next("CANCEL", (b) =>
          (b.cancels as { attempt_id: string }[]).some((c) => c.attempt_id === s!.attempt_id),
        );
        assert.deepEqual(cancel.cancels, [{ attempt_id: s!.attempt_id, reason: "timeout" }]);
      }
      const done = await taskIn(stack.sm, task.task_id, ["complete", "error", "cancelled"]);
      assert.equal(done.state, "error");
      assert.deepEqual(outcomes(await stack.sm.getAttempts(task.task_id)), ["timeout", "timeout"]);
    });

    it("completes on the second attempt when only the first one hangs", async () => {
      await register(
        template("times_out_once", [
          {
            name: "slow_once",
            handler: "to_once",
            timeout_ms: 300,
            retry: { max_attempts: 2, backoff: { initial_ms: 20, jitter: 0 } },
          },
        ]),
      );
      const release = gate();
      cleanups.push(() => release.open()); // lets the hung first attempt return before its pool closes
      let firstAborted = false;
      await inProcessPool(
        (p) =>
          p.handle("to_once", async (step: Step, ctx: StepContext) => {
            if (step.attempt === 1) {
              void untilAborted(ctx.signal).then(() => (firstAborted = true));
              await release.promise; // hangs past its lease, whatever the signal says
              return { late: true };
            }
            return { attempt: step.attempt };
          }),
        2,
      );
      const { task } = await stack.broker.submit({ namespace: NS, name: "times_out_once", context: {} });

      const done = await stack.waitForTask(task.task_id);
      assert.equal(done.state, "complete");
      assert.deepEqual(stepOf(done, "slow_once").output, { attempt: 2 });
      assert.deepEqual(outcomes(await stack.sm.getAttempts(task.task_id)), ["timeout", "complete"]);
      assert.ok(firstAborted, "the first attempt's signal was aborted");
    });
  });

  describe("a task cancelled mid-run", () => {
    it("cancels the task and its unfinished steps and aborts the running handler", async () => {
      await register(
        template("cancelled", [
          { name: "first", handler: "cx_sleep" },
          { name: "second", handler: "cx_sleep", depends_on: ["first"] },
        ]),
      );
      const started = gate();
      let reason: unknown;
      await inProcessPool((p) =>
        p.handle("cx_sleep", async (_step: Step, ctx: StepContext) => {
          started.open();
          await untilAborted(ctx.signal);
          reason = ctx.signal.reason;
          throw ctx.signal.reason;
        }),
      );
      const { task } = await stack.broker.submit({ namespace: NS, name: "cancelled", context: {} });
      await started.promise;

      const after = await stack.broker.cancel(task.task_id);
      assert.equal(after?.state, "cancelled");
      assert.deepEqual(
        after!.steps!.map((s) => [s.name, s.state]),
        [
          ["first", "cancelled"],
          ["second", "cancelled"],
        ],
      );
      await eventually("the handler's signal to abort", () => (reason !== undefined ? reason : undefined));
      assert.ok(reason instanceof StepAbortedError);
      assert.equal(reason.code, "task_cancelled");
      assert.deepEqual(outcomes(await stack.sm.getAttempts(task.task_id)), ["cancelled"]);
      const later = await stack.sm.getTask(task.task_id, { includeSteps: true });
      assert.equal(later?.state, "cancelled", "nothing the pool sent afterwards changed the task");
    });

    it("acknowledges a late result of the cancelled attempt as stale and stores nothing", async () => {
      await register(template("cancelled_late", [{ name: "only", handler: "cx_raw" }]));
      const raw = rawPool();
      await raw.hello(["cx_raw"]);
      raw.heartbeatEvery(50);
      const { task } = await stack.broker.submit({ namespace: NS, name: "cancelled_late", context: {} });
      const [s] = await raw.nextSteps();

      await stack.broker.cancel(task.task_id);
      const cancel = await raw.next("CANCEL");
      assert.deepEqual(cancel.cancels, [{ attempt_id: s!.attempt_id, reason: "task_cancelled" }]);
      await raw.send("RESULT", {
        results: [{ attempt_id: s!.attempt_id, status: "complete", output: { too: "late" } }],
      });
      const ack = await raw.next("ACK");
      assert.deepEqual(ack.acks, [{ attempt_id: s!.attempt_id, outcome: "stale" }]);

      const after = await stack.sm.getTask(task.task_id, { includeSteps: true });
      assert.equal(after?.state, "cancelled");
      const step = stepOf(after!, "only");
      assert.equal(step.state, "cancelled");
      assert.equal("output" in step, false, "no output was stored");
      assert.deepEqual(outcomes(await stack.sm.getAttempts(task.task_id)), ["cancelled"]);
    });
  });

  describe("handlers that throw", () => {
    it("fails the task after one attempt on a permanent error and stores the error", async () => {
      await register(
        template("permanent", [{ name: "boom", handler: "er_perm", retry: { max_attempts: 3 } }]),
      );
      await nodePool("er_perm=permanent");
      const { task } = await stack.broker.submit({ namespace: NS, name: "permanent", context: {} });

      const done = await stack.waitForTask(task.task_id);
      assert.equal(done.state, "error");
      assert.deepEqual(done.error?.failed_steps, ["boom"]);
      const step = stepOf(done, "boom");
      assert.equal(step.state, "error");
      assert.equal(step.attempts, 1, "a permanent error is not retried");
      assert.equal(step.error?.type, "AlwaysFails");
      assert.equal(step.error?.message, "this handler always fails permanently");
      assert.equal(step.error?.retryable, false);
      const attempts = await stack.sm.getAttempts(task.task_id);
      assert.deepEqual(outcomes(attempts), ["error"]);
      assert.equal(attempts[0]!.error?.type, "AlwaysFails");
    });

    it("retries a retryable error and completes on the third attempt", async () => {
      await register(
        template("flaky", [
          {
            name: "wobbly",
            handler: "er_flaky",
            config: { failures: 2 },
            retry: { max_attempts: 3, backoff: { initial_ms: 20, jitter: 0 } },
          },
        ]),
      );
      await nodePool("er_flaky=flaky", 1, ["--state-dir", join(tmp, "flaky")]);
      const { task } = await stack.broker.submit({ namespace: NS, name: "flaky", context: {} });

      const done = await stack.waitForTask(task.task_id);
      assert.equal(done.state, "complete");
      const step = stepOf(done, "wobbly");
      assert.equal(step.attempts, 3);
      assert.deepEqual(step.output, { failures: 2 });
      const attempts = await stack.sm.getAttempts(task.task_id);
      assert.deepEqual(outcomes(attempts), ["error", "error", "complete"]);
      assert.deepEqual(
        attempts.map((a) => a.error?.type ?? null),
        ["FlakyFailure", "FlakyFailure", null],
      );
    });
  });

  describe("a pool that stops heartbeating without closing its socket", () => {
    it("is purged, its step re-dispatched to a healthy pool, and it must HELLO again to be heard", async () => {
      await register(template("silent", [{ name: "work", handler: "sl_work", timeout_ms: 60_000 }]));
      const silentPool = rawPool();
      await silentPool.hello(["sl_work"]);
      const { task } = await stack.broker.submit({ namespace: NS, name: "silent", context: {} });
      const [s] = await silentPool.nextSteps(); // ...and from now on says nothing
      // In this process, beside the broker: a child process starved by a loaded machine right after
      // its WELCOME misses its own heartbeats and is purged too (an extra lost attempt), while here
      // whatever keeps this pool from heartbeating also stalls the broker, which then restarts every
      // pool's liveness clock instead of purging it.
      const healthy = await inProcessPool((p) =>
        p.handle("sl_work", (step: Step) => ({ echoed: step.context })),
      );

      const done = await stack.waitForTask(task.task_id);
      assert.equal(done.state, "complete");
      assert.ok(
        !stack.broker.listPools().some((p) => p.pool_id === silentPool.poolId),
        "the silent pool was purged",
      );
      const attempts = await stack.sm.getAttempts(task.task_id);
      assert.deepEqual(
        attempts.map((a) => [a.poolId, a.outcome]),
        [
          [silentPool.poolId, "lost"],
          [healthy.poolId, "complete"],
        ],
      );
      assert.equal(attempts[0]!.attemptId, s!.attempt_id);

      await silentPool.send("HEARTBEAT", {});
      const err = await silentPool.next("ERROR");
      assert.equal(err.code, "hello_required");
      await silentPool.send("RESULT", {
        results: [{ attempt_id: s!.attempt_id, status: "complete", output: "late" }],
      });
      assert.equal((await silentPool.next("ERROR")).code, "hello_required");
      assert.deepEqual(
        outcomes(await stack.sm.getAttempts(task.task_id)),
        ["lost", "complete"],
        "nothing changed",
      );
    });
  });
});

describe("broker killed and restarted (broker in a child process, pools over tcp://127.0.0.1)", function () {
  this.timeout(90_000);
  const state = useStateManager("faults_restart");
  /** Pools are closed first, while a broker can still take their goodbyes; brokers after. */
  const cleanups: (() => Promise<void> | void)[] = [];
  const brokers: BrokerProcess[] = [];
  /** Logs of this test's brokers and pools, printed when it fails. */
  let logs: [string, () => string][] = [];
  afterEach(async function () {
    this.timeout(30_000);
    if (this.currentTest?.state === "failed") {
      for (const [who, text] of logs) process.stderr.write(`\n--- ${who} ---\n${text()}\n`);
    }
    logs = [];
    while (cleanups.length) await cleanups.pop()!();
    while (brokers.length) await brokers.pop()!.stop();
    await assertInvariants(state);
  });

  async function broker(endpoint: string, brokerId: string, recoveryGraceMs: number): Promise<BrokerProcess> {
    const b = await spawnBrokerProcess({
      endpoint,
      schema: state.schema,
      brokerId,
      recoveryGraceMs,
      env: { STEPBROKER_LOG_LEVEL: "info" },
    });
    brokers.push(b);
    logs.push([`broker ${brokers.length}`, () => b.stderr()]);
    return b;
  }

  /** A logger whose lines are kept for the failure report. */
  function capturedLogger(who: string): Logger {
    let text = "";
    logs.push([who, () => text]);
    return pino({ level: "info" }, { write: (line: string) => void (text = (text + line).slice(-8000)) });
  }

  /** A pool of capacity 1 whose handler holds each step until `release` opens; `runs()` counts its runs. */
  async function heldPool(
    endpoint: string,
    handler: string,
    prefix: string,
  ): Promise<{ started: ReturnType<typeof gate>; release: ReturnType<typeof gate>; runs: () => number }> {
    const started = gate();
    const release = gate();
    let runs = 0;
    const pool = new HandlerPool({
      endpoint,
      poolId: `${prefix}-${uid()}`,
      capacity: 1,
      logger: capturedLogger("pool"),
      reconnect: { initialMs: 50, maxMs: 300 },
    });
    pool.handle(handler, async (step: Step) => {
      runs++;
      started.open();
      await release.promise;
      return { attempt_id: step.attemptId };
    });
    cleanups.push(() => release.open());
    cleanups.push(() => pool.close({ drainMs: 200, ackTimeoutMs: 500 }));
    await pool.start();
    return { started, release, runs: () => runs };
  }

  it("adopts the attempt a reconnecting pool still holds and stores its resent result once", async () => {
    await state.sm.registerTemplate(
      template("restart_adopt", [{ name: "work", handler: "rs_work", timeout_ms: 60_000 }]),
    );
    const endpoint = await freeTcpEndpoint();
    const brokerId = `restart-${uid()}`;
    const first = await broker(endpoint, brokerId, 3000);

    const { started, release, runs } = await heldPool(endpoint, "rs_work", "rs");

    const { task } = await state.sm.createTask({ namespace: NS, name: "restart_adopt", context: {} });
    await started.promise;
    await first.kill9();
    release.open(); // the step finishes while no broker is there: the pool keeps the result
    await broker(endpoint, brokerId, 3000);

    const done = await taskIn(state.sm, task.task_id, ["complete", "error", "cancelled"]);
    assert.equal(done.state, "complete");
    const step = stepOf(done, "work");
    assert.equal(step.attempts, 1);
    const attempts = await state.sm.getAttempts(task.task_id);
    assert.deepEqual(outcomes(attempts), ["complete"], "one attempt, stored once");
    assert.deepEqual(step.output, { attempt_id: attempts[0]!.attemptId });
    assert.equal(runs(), 1, "the handler ran exactly once");
  });

  it("does not take its pools for dead after the broker itself was stopped for 3 s (SIGSTOP), and re-runs nothing", async () => {
    await state.sm.registerTemplate(
      template("stall", [{ name: "work", handler: "st_work", timeout_ms: 60_000 }]),
    );
    const endpoint = await freeTcpEndpoint();
    // Pools are declared dead after 3 heartbeats of 300 ms: the 3 s stop is three times that.
    const b = await spawnBrokerProcess({
      endpoint,
      schema: state.schema,
      brokerId: `stall-${uid()}`,
      heartbeatMs: 300,
      env: { STEPBROKER_LOG_LEVEL: "info" },
    });
    brokers.push(b);
    logs.push(["broker", () => b.stderr()]);
    const { started, release, runs } = await heldPool(endpoint, "st_work", "st");

    const { task } = await state.sm.createTask({ namespace: NS, name: "stall", context: {} });
    await started.promise;
    b.child.kill("SIGSTOP");
    await new Promise((r) => setTimeout(r, 3000));
    b.child.kill("SIGCONT");
    await eventually("the broker to say it was stalled", async () =>
      b.stderr().includes("the broker did not run for") ? true : undefined,
    );
    release.open();

    const done = await taskIn(state.sm, task.task_id, ["complete", "error", "cancelled"]);
    assert.equal(done.state, "complete");
    assert.deepEqual(outcomes(await state.sm.getAttempts(task.task_id)), ["complete"], "one attempt");
    assert.equal(runs(), 1, "the handler ran once: the pool was not purged and its step not re-run");
    assert.ok(!/lost \(missed heartbeats\)/.test(b.stderr()), "no pool was declared dead");
  });

  it("makes an attempt no pool reclaims ready again after the recovery grace, and completes it", async () => {
    await state.sm.registerTemplate(
      template("restart_orphan", [{ name: "work", handler: "ro_work", timeout_ms: 60_000 }]),
    );
    const endpoint = await freeTcpEndpoint();
    const brokerId = `orphan-${uid()}`;
    const first = await broker(endpoint, brokerId, 600);
    // Both pools are in this process: a pool process spawned on a loaded machine can take longer
    // to start than the test has, and can miss its heartbeats right after its WELCOME (a lost
    // attempt of its own), which is not what this test is about.
    const doomed = new RawPool(`ro-a-${uid()}`, endpoint);
    cleanups.push(() => doomed.close());
    await doomed.hello(["ro_work"]);
    doomed.heartbeatEvery(100);

    const { task } = await state.sm.createTask({ namespace: NS, name: "restart_orphan", context: {} });
    const [claimed] = await doomed.nextSteps();
    // The broker dies first (so it cannot release the attempt), then the only pool that held it:
    // its socket closes with the attempt unanswered, so nothing can reclaim it in a HELLO.
    await first.kill9();
    doomed.close();

    await broker(endpoint, brokerId, 600);
    const healthy = new HandlerPool({
      endpoint,
      poolId: `ro-b-${uid()}`,
      capacity: 1,
      logger: capturedLogger("healthy pool"),
      reconnect: { initialMs: 50, maxMs: 300 },
    });
    healthy.handle("ro_work", (step: Step) => ({ attempt: step.attempt }));
    cleanups.push(() => healthy.close({ drainMs: 200, ackTimeoutMs: 500 }));
    await healthy.start();

    const done = await taskIn(state.sm, task.task_id, ["complete", "error", "cancelled"]);
    assert.equal(done.state, "complete");
    assert.equal(stepOf(done, "work").attempts, 2, "the orphaned attempt counts");
    const attempts = await state.sm.getAttempts(task.task_id);
    assert.deepEqual(
      attempts.map((a) => [a.attemptId === claimed!.attempt_id ? "claimed" : "new", a.poolId, a.outcome]),
      [
        ["claimed", doomed.poolId, "lost"],
        ["new", healthy.poolId, "complete"],
      ],
    );
  });
});
