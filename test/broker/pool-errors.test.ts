/**
 * A pool that cannot read a step it was sent says so with ERROR naming the
 * attempt; the broker puts the step back at once instead of waiting out its
 * lease.
 */
import { strict as assert } from "node:assert";
import { Dealer } from "zeromq";
import { decodeMessage, encodeMessage, type StepDispatch } from "../../protocol";
import { useBrokerStack } from "../support/stack";

async function nextStep(sock: Dealer): Promise<StepDispatch> {
  for (;;) {
    const frames = await sock.receive();
    const d = decodeMessage(frames);
    if (d.ok && d.message.command === "STEP") return d.message.body.steps[0]!;
  }
}

describe("a pool that cannot read a step", function () {
  this.timeout(20_000);
  const stack = useBrokerStack("pool_errors", "tcp", { leaseCheckMs: 60_000 });
  let sock: Dealer | undefined;
  afterEach(() => sock?.close());

  it("gets the step back from the broker at once, as a new attempt", async () => {
    await stack.registerTemplate({
      namespace: "pe",
      name: "one",
      version: "1",
      // A lease far longer than the test: only the ERROR can put the step back in time.
      steps: [{ name: "only", handler: "raw", timeout_ms: 600_000 }],
    });
    sock = new Dealer({ routingId: "raw-pool", linger: 0, receiveTimeout: 10_000 });
    sock.connect(stack.endpoint);
    await sock.send(
      encodeMessage("HELLO", {
        pool_id: "raw-pool",
        handlers: ["raw"],
        capacity: 1,
        sdk: { language: "test", name: "raw", version: "0" },
      }),
    );
    const { task } = await stack.broker.submit({ namespace: "pe", name: "one", context: {} });
    const first = await nextStep(sock);
    assert.equal(first.attempt, 1);
    await sock.send(
      encodeMessage("ERROR", {
        code: "schema_violation",
        message: "cannot read this step",
        command: "STEP",
        attempt_id: first.attempt_id,
      }),
    );
    const second = await nextStep(sock);
    assert.equal(second.step_id, first.step_id);
    assert.notEqual(second.attempt_id, first.attempt_id);
    assert.equal(second.attempt, 2, "the unreadable attempt counts");
    await sock.send(
      encodeMessage("RESULT", {
        results: [{ attempt_id: second.attempt_id, status: "complete", output: { ok: true } }],
      }),
    );
    const done = await stack.waitForTask(task.task_id);
    assert.equal(done.state, "complete");
    const attempts = await stack.sm.getAttempts(task.task_id);
    assert.deepEqual(attempts.map((a) => a.outcome).sort(), ["complete", "lost"]);
  });
});
