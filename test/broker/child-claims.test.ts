/**
 * A parent's result and its children's claim in one transaction, seen from
 * the broker: the children reach the pool without a claim of their own, and
 * the credit set aside for them is never more than the pool's.
 */
import { strict as assert } from "node:assert";
import type { StateManager } from "../../broker/state/StateManager";
import { HandlerPool } from "../../handlers-node";
import { silent, stepOf, useBrokerStack } from "../support/stack";

const DIAMOND = {
  namespace: "cc",
  name: "diamond",
  version: "1",
  steps: [
    { name: "a", handler: "slow" },
    { name: "b", handler: "slow", depends_on: ["a"] },
    { name: "c", handler: "slow", depends_on: ["a"] },
    { name: "d", handler: "slow", depends_on: ["b", "c"] },
  ],
};

/** The state manager, recording which steps each kind of claim handed out. */
function recording(sm: StateManager): {
  state: StateManager;
  byClaim: string[];
  withResults: string[];
  limits: number[];
  /** How many results each commit stored, in order. */
  batches: number[];
} {
  const log = {
    byClaim: [] as string[],
    withResults: [] as string[],
    limits: [] as number[],
    batches: [] as number[],
  };
  const state = Object.create(sm) as StateManager;
  state.claimSteps = async (request) => {
    const steps = await sm.claimSteps(request);
    log.byClaim.push(...steps.map((s) => s.step_name));
    return steps;
  };
  state.completeAttempts = async (results, claim) => {
    if (claim) log.limits.push(claim.limit);
    log.batches.push(results.length);
    const out = await sm.completeAttempts(results, claim);
    log.withResults.push(...out.claimed.map((s) => s.step_name));
    return out;
  };
  return { state, ...log };
}

describe("children claimed with their parent's result (broker, inproc://)", function () {
  this.timeout(30_000);
  // No polling: every dispatch here is caused by a result, a commit or a new task.
  const stack = useBrokerStack("child_claims", "inproc", { pollMs: 60_000 });
  let pool: HandlerPool | undefined;

  before(async () => {
    await stack.registerTemplate(DIAMOND);
  });
  afterEach(async () => {
    await pool?.close({ drainMs: 1000 });
    pool = undefined;
  });

  async function restartBroker(): Promise<ReturnType<typeof recording>> {
    await stack.broker.stop({ drainMs: 0 });
    const rec = recording(stack.sm);
    await stack.startBroker({ state: rec.state });
    return rec;
  }

  async function startPool(capacity: number): Promise<void> {
    pool = new HandlerPool({ endpoint: stack.endpoint, capacity, logger: silent });
    // Long enough for the dispatch round the new task's notification starts to be over.
    pool.handle("slow", async (step) => {
      await new Promise((r) => setTimeout(r, 30));
      return { name: step.stepName, inputs: step.inputs };
    });
    await pool.start();
  }

  it("sends the children a result readies without claiming them again", async () => {
    const rec = await restartBroker();
    await startPool(4);
    const { task } = await stack.broker.submit({ namespace: "cc", name: "diamond", context: {} });
    const done = await stack.waitForTask(task.task_id);
    assert.equal(done.state, "complete");
    assert.deepEqual(rec.byClaim, ["a"], "only the root is claimed on its own");
    assert.deepEqual([...rec.withResults].sort(), ["b", "c", "d"]);
    assert.deepEqual((stepOf(done, "d").output as { inputs: unknown }).inputs, {
      b: stepOf(done, "b").output,
      c: stepOf(done, "c").output,
    });
  });

  it("stores the two parents of a join in one commit when one RESULT carries both", async () => {
    const rec = await restartBroker();
    pool = new HandlerPool({ endpoint: stack.endpoint, capacity: 4, logger: silent });
    // b and c finish together (each waits for the other to start), so the pool sends one RESULT
    // with both; a and d return at once.
    const started = new Set<string>();
    let bothStarted: () => void = () => undefined;
    const both = new Promise<void>((r) => (bothStarted = r));
    pool.handle("slow", async (step) => {
      if (step.stepName === "b" || step.stepName === "c") {
        started.add(step.stepName);
        if (started.size === 2) bothStarted();
        await both;
      }
      return { name: step.stepName };
    });
    await pool.start();
    const { task } = await stack.broker.submit({ namespace: "cc", name: "diamond", context: {} });
    const done = await stack.waitForTask(task.task_id);
    assert.equal(done.state, "complete");
    // Committing b alone first would put a whole commit between c's result and d.
    assert.deepEqual(rec.batches, [1, 2, 1], "a, then b and c together, then d");
    assert.deepEqual([...rec.withResults].sort(), ["b", "c", "d"], "d was claimed by b and c's commit");
  });

  it("sets aside no more than the pool's credit, and leaves the rest to dispatch", async () => {
    const rec = await restartBroker();
    await startPool(1);
    const { task } = await stack.broker.submit({ namespace: "cc", name: "diamond", context: {} });
    const done = await stack.waitForTask(task.task_id);
    assert.equal(done.state, "complete");
    assert.ok(
      rec.limits.every((l) => l === 1),
      `a pool of capacity 1 never has more set aside: ${rec.limits}`,
    );
    // a's result claims one of b and c; the other is dispatched when credit comes back
    assert.equal(rec.withResults.length + rec.byClaim.length, 4);
    assert.ok(rec.withResults.length >= 1, "a's result claimed one child");
    assert.ok(rec.byClaim.includes("a"));
    for (const s of done.steps!) assert.equal(s.attempts, 1, `${s.name} ran once`);
  });
});

describe("children claimed with their parent's result go to the pool with the most free credit (broker, inproc://)", function () {
  this.timeout(30_000);
  const stack = useBrokerStack("child_locality", "inproc", { pollMs: 60_000 });
  const pools: HandlerPool[] = [];
  const FAN = {
    namespace: "cl",
    name: "fan",
    version: "1",
    steps: [
      { name: "root", handler: "root" },
      { name: "left", handler: "leaf", depends_on: ["root"] },
      { name: "right", handler: "leaf", depends_on: ["root"] },
    ],
  };
  const ONE = { namespace: "cl", name: "one", version: "1", steps: [{ name: "only", handler: "leaf" }] };

  before(async () => {
    await stack.registerTemplate(FAN);
    await stack.registerTemplate(ONE);
  });
  after(async () => {
    for (const p of pools) await p.close({ drainMs: 1000 });
  });

  it("claims a slow pool's children for a fast pool that has credit free", async () => {
    /** Roots held by the slow pool until the test lets each go, by task id. */
    const holds = new Map<string, () => void>();
    const held = (taskId: string): Promise<void> => new Promise((r) => holds.set(taskId, r));
    const ran = new Map<string, string>();
    const handlers = (pool: HandlerPool, name: string, slowRoots: boolean): void => {
      pool.handle("root", async (step) => {
        if (slowRoots) await held(step.taskId);
        return { by: name };
      });
      pool.handle("leaf", async (step) => {
        ran.set(`${step.taskId}/${step.stepName}`, name);
        return { by: name };
      });
    };
    const slow = new HandlerPool({ endpoint: stack.endpoint, poolId: "slow", capacity: 2, logger: silent });
    handlers(slow, "slow", true);
    pools.push(slow);
    await slow.start();
    // The slow pool proves itself with one quick task, then takes two roots and holds them.
    const warm1 = await stack.broker.submit({ namespace: "cl", name: "one", context: {} });
    await stack.waitForTask(warm1.task.task_id);
    const t1 = await stack.broker.submit({ namespace: "cl", name: "fan", context: {} });
    const t2 = await stack.broker.submit({ namespace: "cl", name: "fan", context: {} });
    const deadline = Date.now() + 10_000;
    while (!(holds.has(t1.task.task_id) && holds.has(t2.task.task_id))) {
      if (Date.now() > deadline) throw new Error("the slow pool did not take both roots");
      await new Promise((r) => setTimeout(r, 10));
    }
    // The fast pool proves itself on work the slow one has no credit for.
    const fast = new HandlerPool({ endpoint: stack.endpoint, poolId: "fast", capacity: 16, logger: silent });
    handlers(fast, "fast", false);
    pools.push(fast);
    await fast.start();
    const warm2 = await stack.broker.submit({ namespace: "cl", name: "one", context: {} });
    assert.equal(stepOf(await stack.waitForTask(warm2.task.task_id), "only").state, "complete");
    assert.equal(ran.get(`${warm2.task.task_id}/only`), "fast");

    // t1's root ends at the slow pool, which still holds t2's root (1 of 2 free); the fast pool has 16.
    holds.get(t1.task.task_id)!();
    const done = await stack.waitForTask(t1.task.task_id);
    assert.equal(done.state, "complete");
    assert.equal(ran.get(`${t1.task.task_id}/left`), "fast");
    assert.equal(ran.get(`${t1.task.task_id}/right`), "fast");
    holds.get(t2.task.task_id)!();
    assert.equal((await stack.waitForTask(t2.task.task_id)).state, "complete");
  });
});
