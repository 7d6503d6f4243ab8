/**
 * A Python pool process that dies with SIGKILL in the middle of a step: the
 * broker notices the pool is gone, records the attempt as lost, and the step
 * runs again on another Python pool and completes exactly once.
 */
import { strict as assert } from "node:assert";
import { randomBytes } from "node:crypto";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { ensurePython, pythonTestPoolArgs } from "../support/languages";
import { eventually, spawnPool, stepOf, useBrokerStack, type ChildPool } from "../support/stack";

const SLEEPY = {
  namespace: "pykill",
  name: "sleepy",
  version: "1",
  // long enough that the kill lands while the handler sleeps; short enough for the second run
  steps: [{ name: "nap", handler: "sleep", config: { ms: 3000 } }],
};

describe("a Python pool killed with SIGKILL mid-step", function () {
  this.timeout(60_000);
  const stack = useBrokerStack("pykill", "tcp");
  const pools: ChildPool[] = [];
  let python: string;

  before(async function () {
    python = await ensurePython(this);
    await stack.registerTemplate(SLEEPY);
  });
  afterEach(async function () {
    this.timeout(30_000);
    await Promise.all(pools.splice(0).map((p) => p.stop()));
  });

  async function pythonPool(poolId: string, logLevel = "WARNING"): Promise<ChildPool> {
    const pool = await spawnPool(
      python,
      pythonTestPoolArgs(stack.endpoint, join(stack.tmp, `py-state-${randomBytes(3).toString("hex")}`), [
        "--handlers",
        "sleep",
        "--capacity",
        "1",
        "--pool-id",
        poolId,
        "--log-level",
        logLevel,
      ]),
    );
    pools.push(pool);
    await eventually(`pool ${poolId} to be welcomed`, () =>
      stack.broker.listPools().some((p) => p.pool_id === poolId) ? true : undefined,
    );
    return pool;
  }

  it("runs the step again on another Python pool, and completes it once", async () => {
    const id = randomBytes(3).toString("hex");
    const first = await pythonPool(`py-doomed-${id}`, "DEBUG");
    // The pool logs each attempt it takes on, at debug level, as it hands it to a worker thread.
    const taken = new Set<string>();
    createInterface({ input: first.child.stderr! }).on("line", (line) => {
      const m = /attempt ([0-9a-f-]{36}) .*dispatched/.exec(line);
      if (m) taken.add(m[1]!);
    });

    const { task } = await stack.broker.submit({ namespace: "pykill", name: "sleepy", context: {} });
    // The attempt the doomed pool said it took on (attempts get their pool id only when they complete).
    const running = await eventually("the step to be running in the first pool", async () => {
      const attempts = await stack.sm.getAttempts(task.task_id);
      return attempts.find((a) => a.outcome === null && taken.has(a.attemptId));
    });

    await pythonPool(`py-spare-${id}`);
    await first.kill9();

    const done = await stack.waitForTask(task.task_id, 30_000);
    assert.equal(done.state, "complete", JSON.stringify(done));
    assert.deepEqual(stepOf(done, "nap").output, { slept_ms: 3000, lang: "python" });

    const attempts = await stack.sm.getAttempts(task.task_id);
    assert.deepEqual(
      attempts.map((a) => a.outcome).sort(),
      ["complete", "lost"],
      "two attempts: one lost, one complete",
    );
    const lost = attempts.find((a) => a.outcome === "lost")!;
    const complete = attempts.find((a) => a.outcome === "complete")!;
    assert.equal(
      lost.attemptId,
      running.attemptId,
      "the attempt that was running in the killed pool is the lost one",
    );
    assert.equal(complete.poolId, `py-spare-${id}`, "the step completed on the other Python pool");
    assert.notEqual(lost.poolId, null, "the lost attempt names the pool it was sent to");
    assert.notEqual(lost.poolId, complete.poolId);
    assert.ok(complete.attempt > lost.attempt, "the completing run came after the lost one");
  });
});
