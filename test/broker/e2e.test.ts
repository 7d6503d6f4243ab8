/**
 * The broker and Node.js pools end to end: real sockets, a real PostgreSQL,
 * in-process pools over inproc:// and child-process pools over ipc:// and tcp://.
 */
import { strict as assert } from "node:assert";
import { HandlerPool } from "../../handlers-node";
import {
  eventually,
  silent,
  spawnNodePool,
  stepOf,
  useBrokerStack,
  type ChildPool,
  type Transport,
} from "../support/stack";

const DIAMOND = {
  namespace: "e2e",
  name: "diamond",
  version: "1",
  steps: [
    { name: "a", handler: "echo" },
    { name: "b", handler: "echo", depends_on: ["a"] },
    { name: "c", handler: "echo", depends_on: ["a"] },
    { name: "d", handler: "echo", depends_on: ["b", "c"] },
  ],
};

const SPLIT = {
  namespace: "e2e",
  name: "split",
  version: "1",
  steps: [
    { name: "left", handler: "left_side" },
    { name: "right", handler: "right_side" },
    { name: "join", handler: "left_side", depends_on: ["left", "right"] },
  ],
};

type Echo = { inputs: Record<string, Echo>; context: Record<string, unknown>; step?: unknown };

for (const transport of ["inproc", "ipc", "tcp"] as Transport[]) {
  describe(`end to end over ${transport}://`, function () {
    this.timeout(30_000);
    const stack = useBrokerStack(`e2e_${transport}`, transport);
    const started: { close(): Promise<void> }[] = [];

    /** A pool serving `handlers` (name=behaviour, as the fixture takes them). */
    async function pool(handlers: string, capacity = 4, extra: string[] = []): Promise<void> {
      if (transport === "inproc") {
        const p = new HandlerPool({ endpoint: stack.endpoint, capacity, logger: silent });
        for (const spec of handlers.split(",")) {
          const [name, behaviour = name] = spec.split("=") as [string, string?];
          if (behaviour !== "echo") throw new Error(`in-process test pools only echo, not ${behaviour}`);
          p.handle(name, async (step) => ({ inputs: step.inputs, context: step.context, handler: name }));
        }
        await p.start();
        started.push({ close: () => p.close({ drainMs: 1000 }) });
      } else {
        const child: ChildPool = await spawnNodePool(stack.endpoint, [
          "--handlers",
          handlers,
          "--capacity",
          String(capacity),
          ...extra,
        ]);
        started.push({ close: () => child.stop() });
      }
    }

    before(async () => {
      await stack.registerTemplate(DIAMOND);
      await stack.registerTemplate(SPLIT);
    });
    afterEach(async () => {
      while (started.length) await started.pop()!.close();
    });

    it("runs a diamond workflow and gives every step its parents' outputs", async () => {
      await pool("echo");
      const { task } = await stack.broker.submit({
        namespace: "e2e",
        name: "diamond",
        context: { order: 7 },
      });
      const done = await stack.waitForTask(task.task_id);
      assert.equal(done.state, "complete");
      const d = stepOf(done, "d").output as Echo;
      const b = stepOf(done, "b").output as Echo;
      assert.deepEqual(Object.keys(d.inputs).sort(), ["b", "c"]);
      assert.deepEqual(d.inputs.b, b, "d received b's stored output");
      assert.deepEqual(b.inputs.a, stepOf(done, "a").output, "b received a's stored output");
      assert.deepEqual(d.context, { order: 7 });
      for (const s of done.steps!) assert.equal(s.attempts, 1, `${s.name} ran once`);
    });

    it("routes each step to a pool that serves its handler", async () => {
      await pool("left_side=echo", 2, ["--pool-id", `left-${transport}`]);
      await pool("right_side=echo", 2, ["--pool-id", `right-${transport}`]);
      const { task } = await stack.broker.submit({ namespace: "e2e", name: "split", context: {} });
      const done = await stack.waitForTask(task.task_id);
      assert.equal(done.state, "complete");
      const attempts = await stack.sm.getAttempts(task.task_id);
      const byStep = new Map(done.steps!.map((s) => [s.step_id, s.name]));
      for (const a of attempts) {
        const name = byStep.get(a.stepId);
        if (transport !== "inproc") {
          assert.equal(
            a.poolId,
            name === "right" ? `right-${transport}` : `left-${transport}`,
            `${name} ran on the right pool`,
          );
        }
        assert.equal(a.outcome, "complete");
      }
    });

    it("lists connected pools with their handlers, capacity and in-flight counts", async () => {
      await pool("echo", 3);
      const pools = await eventually("the pool to be listed", () => {
        const listed = stack.broker.listPools();
        return listed.length === 1 ? listed : undefined;
      });
      assert.deepEqual(pools[0]!.handlers, ["echo"]);
      assert.equal(pools[0]!.capacity, 3);
      assert.equal(pools[0]!.sdk.language, "node");
    });
  });
}
