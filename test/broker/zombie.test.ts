/**
 * A zombie pool: it heartbeats, but after its first few steps its handler
 * never returns and ignores its abort signal. Beside a healthy pool every
 * task must still complete: the zombie's timed-out attempts keep its slots
 * (it lists them in HEARTBEAT `cancelling`), retries avoid it, and after
 * three timeouts in a row it is quarantined.
 */
import { strict as assert } from "node:assert";
import { HandlerPool } from "../../handlers-node";
import { eventually, silent, useBrokerStack } from "../support/stack";

const TEMPLATE = {
  namespace: "zombie",
  name: "one",
  version: "1",
  steps: [
    {
      name: "work",
      handler: "zw",
      timeout_ms: 400,
      // Two attempts only: a step whose retry went back to the zombie would fail.
      retry: {
        max_attempts: 2,
        retryable: true,
        backoff: { initial_ms: 10, multiplier: 1, max_ms: 10, jitter: 0 },
      },
    },
  ],
};

describe("a zombie pool beside a healthy one (broker, inproc://)", function () {
  this.timeout(60_000);
  const stack = useBrokerStack("zombie", "inproc", { leaseCheckMs: 50, heartbeatMs: 200 });
  const pools: HandlerPool[] = [];
  /** The zombie's stuck handlers, let go at the end so the pool can close. */
  const stuck: (() => void)[] = [];

  before(async () => {
    await stack.registerTemplate(TEMPLATE);
  });
  after(async () => {
    // Closed first, while the stuck handlers still hang (as a zombie's would); let go after.
    for (const p of pools) await p.close({ drainMs: 500 });
    for (const letGo of stuck) letGo();
  });

  it("completes all 50 tasks, and quarantines the zombie after three timeouts in a row", async () => {
    let zombieCalls = 0;
    const zombie = new HandlerPool({
      endpoint: stack.endpoint,
      poolId: "zombie",
      capacity: 4,
      logger: silent,
    });
    zombie.handle("zw", async () => {
      // Proves itself first, so the broker trusts it with work; then never returns.
      if (++zombieCalls <= 2) return { by: "zombie" };
      await new Promise<void>((r) => stuck.push(r));
      return { by: "zombie, too late" };
    });
    pools.push(zombie);
    await zombie.start();
    for (let i = 0; i < 2; i++) {
      const { task } = await stack.broker.submit({ namespace: "zombie", name: "one", context: {} });
      assert.equal((await stack.waitForTask(task.task_id)).state, "complete");
    }

    // The 50 tasks go out while the zombie is alone, so it takes a full window
    // (its capacity, 4) and sits on them: three timeouts in a row are then
    // certain, however fast the healthy pool would have drained the rest.
    const tasks = await Promise.all(
      Array.from({ length: 50 }, () =>
        stack.broker.submit({ namespace: "zombie", name: "one", context: {} }),
      ),
    );
    await eventually("the zombie sitting on its 4 slots", () => (zombieCalls >= 2 + 4 ? true : undefined));

    const healthy = new HandlerPool({
      endpoint: stack.endpoint,
      poolId: "healthy",
      capacity: 8,
      logger: silent,
    });
    healthy.handle("zw", async () => {
      await new Promise((r) => setTimeout(r, 20));
      return { by: "healthy" };
    });
    pools.push(healthy);
    await healthy.start();

    const done = await Promise.all(tasks.map(({ task }) => stack.waitForTask(task.task_id, 45_000)));
    const states = done.map((t) => t.state);
    assert.deepEqual(
      states.filter((s) => s !== "complete"),
      [],
      `every task completes (${states.filter((s) => s === "complete").length}/50 did)`,
    );
    assert.ok(zombieCalls > 2, "the zombie did take work and sit on it");

    const view = stack.broker.listPools().find((p) => p.pool_id === "zombie");
    assert.ok(view, "the zombie is still connected: it heartbeats");
    assert.equal(view.quarantined, true, "the zombie is quarantined");
    assert.ok((view.cancelling ?? 0) > 0, "its stuck handlers hold slots");
    assert.equal(stack.broker.listPools().find((p) => p.pool_id === "healthy")?.quarantined, false);
  });
});
