/**
 * A WAIT outlives the broker that received it: the broker ends an open WAIT
 * with ERROR shutting_down when it stops, and the Node client WAITs again
 * with backoff until a broker (here the restarted one, at the same
 * endpoint) says the task finished.
 */
import { strict as assert } from "node:assert";
import { HandlerPool } from "../../handlers-node";
import { StepbrokerClient } from "../../handlers-node/client";
import { silent, useBrokerStack } from "../support/stack";

describe("a client's WAIT across a broker restart (tcp://127.0.0.1)", function () {
  this.timeout(60_000);
  const stack = useBrokerStack("client_wait", "tcp");
  const closing: (() => Promise<unknown> | void)[] = [];
  after(async () => {
    while (closing.length) await closing.pop()!();
  });

  it("answers an open WAIT with shutting_down at stop, and the client WAITs again until the task ends", async () => {
    await stack.registerTemplate({
      namespace: "cw",
      name: "held",
      version: "1",
      steps: [{ name: "work", handler: "cw_work" }],
    });
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    let runs = 0;
    const pool = new HandlerPool({
      endpoint: stack.endpoint,
      capacity: 1,
      logger: silent,
      reconnect: { initialMs: 50, maxMs: 300 },
    });
    pool.handle("cw_work", async () => {
      runs++;
      await gate;
      return { ok: true };
    });
    closing.push(() => pool.close({ drainMs: 500 }));
    await pool.start();

    const client = new StepbrokerClient({ endpoint: stack.endpoint, requestTimeoutMs: 2000 });
    closing.push(() => client.close());
    const { task } = await client.submit({ namespace: "cw", name: "held" }, {});
    while (runs === 0) await new Promise((r) => setTimeout(r, 10));

    // Two WAITs are open when the broker stops: the client's over the wire (which WAITs again)...
    const waited = client.wait(task.task_id, 30_000);
    // ...and one in process, which ends with the code the wire carries.
    const direct = stack.broker.wait(task.task_id, 30_000).then(
      () => "answered",
      (e: Error & { code?: string }) => e.code,
    );
    await new Promise((r) => setTimeout(r, 200));
    await stack.broker.stop({ drainMs: 0 });
    assert.equal(await direct, "shutting_down");

    await stack.startBroker();
    release();
    const out = await waited;
    assert.equal(out.finished, true, "the retried WAIT saw the task end");
    assert.equal(out.task.state, "complete");
  });
});
