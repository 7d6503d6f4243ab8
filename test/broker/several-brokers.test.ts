/**
 * Several brokers on one database, as one service: work shared with each
 * step run once, a CANCEL_TASK or a WAIT on one broker for work under
 * another, a broker killed for good whose work another broker takes back
 * within the stated bound, and a broker restarted under a new id.
 */
import { strict as assert } from "node:assert";
import { randomBytes } from "node:crypto";
import { pino, type Logger } from "pino";
import { Broker } from "../../broker/Broker";
import { BROKER_DEAD_AFTER_MS, BROKER_RECLAIM_INTERVAL_MS } from "../../broker/state/BrokerRegistry";
import { HandlerPool, type Step, type StepContext } from "../../handlers-node";
import { freeTcpEndpoint, spawnBrokerProcess, type BrokerProcess } from "../support/brokerProcess";
import { eventually, FAST, silent, spawnNodePool, useBrokerStack, type ChildPool } from "../support/stack";

const NS = "several";

function uid(): string {
  return randomBytes(3).toString("hex");
}

function oneStep(name: string, handler: string, timeoutMs = 30_000): Record<string, unknown> {
  return { namespace: NS, name, version: "1", steps: [{ name: "work", handler, timeout_ms: timeoutMs }] };
}

/** A logger whose lines the test can read. */
function capture(): { logger: Logger; text: () => string } {
  let text = "";
  const logger = pino({ level: "info" }, { write: (l: string) => void (text = (text + l).slice(-200_000)) });
  return { logger, text: () => text };
}

describe("several brokers on one database (in process, tcp://127.0.0.1)", function () {
  this.timeout(60_000);
  // No poll: whatever crosses brokers here crosses by notification.
  const stack = useBrokerStack("several", "tcp", { pollMs: 60_000 });
  const cleanups: (() => Promise<unknown> | void)[] = [];
  let other: Broker;

  before(async () => {
    other = new Broker({
      endpoints: ["tcp://127.0.0.1:*"],
      state: stack.sm,
      brokerId: `other-${uid()}`,
      logger: silent,
      ...FAST,
      pollMs: 60_000,
    });
    await other.start();
    await stack.registerTemplate(oneStep("shared", "sh_work"));
    await stack.registerTemplate(oneStep("held", "held_work"));
  });
  afterEach(async () => {
    while (cleanups.length) await cleanups.pop()!();
  });
  after(async () => {
    await other.stop({ drainMs: 0 });
  });

  function pool(endpoints: string[], poolId: string, capacity: number): HandlerPool {
    const p = new HandlerPool({ endpoints, poolId, capacity, logger: silent });
    cleanups.push(() => p.close({ drainMs: 500 }));
    return p;
  }

  it("shares the work of pools on each broker and one on both, each step run once", async () => {
    const ran = new Map<string, number>();
    const serve = (p: HandlerPool, name: string): void => {
      p.handle("sh_work", async (step: Step) => {
        ran.set(name, (ran.get(name) ?? 0) + 1);
        return { by: name, step: step.stepId };
      });
    };
    const a = pool([stack.endpoint], "on-a", 4);
    const b = pool([other.endpoints[0]!], "on-b", 4);
    const both = pool([stack.endpoint, other.endpoints[0]!], "on-both", 4);
    serve(a, "a");
    serve(b, "b");
    serve(both, "both");
    await Promise.all([a.start(), b.start(), both.start()]);

    const submitted = await Promise.all(
      Array.from({ length: 300 }, (_, i) =>
        (i % 2 ? other : stack.broker).submit({ namespace: NS, name: "shared", context: { i } }),
      ),
    );
    const done = await Promise.all(submitted.map(({ task }) => stack.waitForTask(task.task_id, 45_000)));
    assert.deepEqual(
      done.filter((t) => t.state !== "complete").map((t) => t.state),
      [],
    );
    for (const t of done) assert.equal(t.steps![0]!.attempts, 1, `task ${t.task_id}: its step ran once`);
    assert.equal(
      [...ran.values()].reduce((x, y) => x + y, 0),
      300,
      "300 handler runs for 300 steps",
    );
    assert.ok((ran.get("a") ?? 0) > 0 && (ran.get("b") ?? 0) > 0, `both brokers dispatched: ${[...ran]}`);
  });

  it("cancels, from one broker, a task whose step runs at a pool of the other", async () => {
    let signalled: unknown;
    let started!: () => void;
    const running = new Promise<void>((r) => (started = r));
    const b = pool([other.endpoints[0]!], "held-on-b", 1);
    b.handle("held_work", async (_step: Step, ctx: StepContext) => {
      started();
      await new Promise<void>((resolve) =>
        ctx.signal.addEventListener("abort", () => {
          signalled = ctx.signal.reason;
          resolve();
        }),
      );
      return null;
    });
    await b.start();
    const { task } = await stack.broker.submit({ namespace: NS, name: "held", context: {} });
    await running;
    const cancelled = await stack.broker.cancel(task.task_id);
    assert.equal(cancelled?.state, "cancelled");
    await eventually("the pool at the other broker to be told", async () => signalled ?? undefined, 10_000);
    assert.equal((signalled as { code?: string }).code, "task_cancelled");
    assert.equal(other.listPools().find((p) => p.pool_id === "held-on-b")?.in_flight, 0);
  });

  it("answers a WAIT on one broker for a task that finished under the other, before the WAIT's timeout", async () => {
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    let started!: () => void;
    const running = new Promise<void>((r) => (started = r));
    const b = pool([other.endpoints[0]!], "wait-on-b", 1);
    b.handle("held_work", async () => {
      started();
      await gate;
      return { ok: true };
    });
    await b.start();
    const { task } = await stack.broker.submit({ namespace: NS, name: "held", context: {} });
    await running;
    // Neither the poll (60 s here) nor the WAIT's own timeout (30 s) can answer within 10 s.
    const waited = stack.broker.wait(task.task_id, 30_000);
    release();
    const out = await Promise.race([waited, new Promise<"late">((r) => setTimeout(() => r("late"), 10_000))]);
    assert.notEqual(out, "late", "the WAIT was answered by the other broker's news, not by its timeout");
    assert.equal(out && out !== "late" ? out.finished : undefined, true);
    assert.equal(out && out !== "late" ? out.task.state : undefined, "complete");
  });
});

describe("a broker that dies for good (brokers in child processes, tcp://127.0.0.1)", function () {
  this.timeout(90_000);
  const stack = useBrokerStack("several_dead", "tcp");
  const cleanups: (() => Promise<unknown> | void)[] = [];
  let logs: [string, () => string][] = [];
  /** The stated bound: dead after BROKER_DEAD_AFTER_MS, found at the next look; margin for a loaded machine. */
  const BOUND_MS = BROKER_DEAD_AFTER_MS + BROKER_RECLAIM_INTERVAL_MS + 10_000;

  afterEach(async function () {
    if (this.currentTest?.state === "failed") {
      for (const [who, text] of logs) process.stderr.write(`\n--- ${who} ---\n${text()}\n`);
    }
    logs = [];
    while (cleanups.length) await cleanups.pop()!();
  });

  async function brokerProcess(endpoint: string, brokerId: string): Promise<BrokerProcess> {
    const b = await spawnBrokerProcess({
      endpoint,
      schema: stack.schema,
      brokerId,
      recoveryGraceMs: 60_000,
      env: { STEPBROKER_LOG_LEVEL: "info" },
    });
    cleanups.push(() => b.stop());
    logs.push([`broker ${brokerId}`, () => b.stderr()]);
    return b;
  }

  async function doomedPoolHolding(endpoint: string, handler: string, template: string): Promise<string> {
    const doomed: ChildPool = await spawnNodePool(endpoint, [
      "--handlers",
      `${handler}=sleep`,
      "--capacity",
      "1",
      "--pool-id",
      `doomed-${uid()}`,
    ]);
    cleanups.push(() => doomed.stop());
    const { task } = await stack.sm.createTask({
      namespace: NS,
      name: template,
      context: { sleep_ms: 120_000 },
    });
    await eventually("the step to be running at the doomed pool", async () => {
      const [a] = await stack.sm.getAttempts(task.task_id);
      return a && a.outcome === null ? a : undefined;
    });
    await doomed.kill9();
    return task.task_id;
  }

  it("has its in-flight step taken back by a live broker within the bound, and completed there", async () => {
    // The step's timeout (120 s) is far beyond the bound: only the dead-broker reclaim can bring it back in time.
    await stack.registerTemplate(oneStep("dies", "die_work", 120_000));
    const live = capture();
    logs.push(["live broker", live.text]);
    // The live broker logs to the test; the stack's own broker stops so that only it can take the work back.
    await stack.broker.stop({ drainMs: 0 });
    const liveBroker = new Broker({
      endpoints: ["tcp://127.0.0.1:*"],
      state: stack.sm,
      brokerId: `live-${uid()}`,
      logger: live.logger,
      ...FAST,
    });
    await liveBroker.start();
    cleanups.push(() => liveBroker.stop({ drainMs: 0 }));

    const deadId = `dead-${uid()}`;
    const dead = await brokerProcess(await freeTcpEndpoint(), deadId);
    const taskId = await doomedPoolHolding(dead.endpoint, "die_work", "dies");
    await dead.kill9();

    const healthy = new HandlerPool({ endpoint: liveBroker.endpoints[0]!, capacity: 1, logger: silent });
    healthy.handle("die_work", async () => ({ by: "healthy" }));
    cleanups.push(() => healthy.close({ drainMs: 500 }));
    await healthy.start();

    const out = await liveBroker.wait(taskId, BOUND_MS);
    assert.equal(out?.finished, true, "the task ended within the bound");
    assert.equal(out.task.state, "complete");
    assert.deepEqual(
      (await stack.sm.getAttempts(taskId)).map((a) => a.outcome),
      ["lost", "complete"],
    );
    assert.match(
      live.text(),
      new RegExp(`recovered 1 attempts from broker ${deadId} \\(last heartbeat \\d+ s ago\\)`),
    );
  });

  it("has the work of its previous life taken back when it restarts under a new id", async () => {
    await stack.registerTemplate(oneStep("renamed", "rn_work", 120_000));
    const endpoint = await freeTcpEndpoint();
    const first = await brokerProcess(endpoint, `first-${uid()}`);
    const taskId = await doomedPoolHolding(endpoint, "rn_work", "renamed");
    await first.kill9();

    // The same endpoint, another id (as adding an endpoint to the default id would give).
    await brokerProcess(endpoint, `second-${uid()}`);
    const healthy = await spawnNodePool(endpoint, ["--handlers", "rn_work=echo", "--capacity", "1"]);
    cleanups.push(() => healthy.stop());
    const done = await stack.waitForTask(taskId, BOUND_MS);
    assert.equal(done.state, "complete");
    assert.deepEqual(
      (await stack.sm.getAttempts(taskId)).map((a) => a.outcome),
      ["lost", "complete"],
    );
  });
});
