/**
 * HISTORY over a real broker and real sockets: a client reads a task's
 * transitions and attempts without SQL. The reply matches the tables row for
 * row; an unknown task is unknown_task; the pool socket refuses it when
 * clients have their own socket; a history over max_message_bytes is
 * reply_too_large while STATUS of the same task still fits; and a
 * well-behaved pool and client keep getting tasks done after each refusal.
 */
import { strict as assert } from "node:assert";
import { randomUUID } from "node:crypto";
import { HandlerPool } from "../../handlers-node";
import { BrokerError, StepbrokerClient } from "../../handlers-node/client";
import type { TaskHistoryView } from "../../protocol";
import { RawPeer } from "../support/rawPeer";
import { silent, useBrokerStack, type Stack, type Transport } from "../support/stack";

const NS = "history";
const DIAMOND = {
  namespace: NS,
  name: "diamond",
  version: "1",
  steps: [
    { name: "a", handler: "echo" },
    // b fails its first attempt, so the history holds an error and a retry
    {
      name: "b",
      handler: "flaky",
      depends_on: ["a"],
      retry: { max_attempts: 2, backoff: { initial_ms: 20, jitter: 0 } },
    },
    { name: "c", handler: "echo", depends_on: ["a"] },
    { name: "d", handler: "echo", depends_on: ["b", "c"] },
  ],
};
/** Ten attempts, each with a long error message: a history far larger than the task itself. */
const RETRIES = 10;
const LONG = {
  namespace: NS,
  name: "long",
  version: "1",
  steps: [
    {
      name: "again",
      handler: "fails_long",
      retry: { max_attempts: RETRIES, backoff: { initial_ms: 10, jitter: 0 } },
    },
  ],
};
const MAX_BYTES = 16 * 1024;

interface TransitionRow {
  step_id: string | null;
  from_state: string | null;
  to_state: string;
  event: string;
  attempt_id: string | null;
}
interface AttemptRow {
  attempt_id: string;
  step_id: string;
  attempt: number;
  pool_id: string | null;
  outcome: string | null;
}

async function startPool(stack: Stack, cleanups: (() => unknown)[]): Promise<HandlerPool> {
  const seen = new Set<string>();
  const pool = new HandlerPool({
    endpoint: stack.endpoint,
    poolId: `hist-${randomUUID().slice(0, 8)}`,
    logger: silent,
  });
  pool.handle("echo", (step) => ({ name: step.stepName }));
  pool.handle("flaky", (step) => {
    if (!seen.has(step.stepId)) {
      seen.add(step.stepId);
      throw new Error("first attempt fails on purpose");
    }
    return { name: step.stepName };
  });
  pool.handle("fails_long", (step) => {
    throw new Error(`attempt ${step.attempt} fails: ${"x".repeat(2000)}`);
  });
  await pool.start();
  cleanups.push(() => pool.close({ drainMs: 500 }));
  return pool;
}

/** What the tables hold for a task, independently of the code that serves HISTORY. */
async function fromTables(
  stack: Stack,
  taskId: string,
): Promise<{ transitions: TransitionRow[]; attempts: AttemptRow[] }> {
  const transitions = await stack.sql<TransitionRow>(
    `select null::uuid as step_id, from_state, to_state, event, attempt_id, created_at, null::int as position, sort_key
       from task_transitions where task_id = $1
     union all
     select tr.step_id, tr.from_state, tr.to_state, tr.event, tr.attempt_id, tr.created_at, s.position, tr.sort_key
       from step_transitions tr join steps s on s.id = tr.step_id where s.task_id = $1
     order by created_at, position nulls first, sort_key`,
    [taskId],
  );
  const attempts = await stack.sql<AttemptRow>(
    `select a.attempt_id, a.step_id, a.attempt, a.pool_id, a.outcome from step_attempts a
       join steps s on s.id = a.step_id where s.task_id = $1 order by a.started_at, s.position, a.attempt`,
    [taskId],
  );
  return { transitions, attempts };
}

function checkAgainstTables(h: TaskHistoryView, rows: Awaited<ReturnType<typeof fromTables>>): void {
  assert.deepEqual(
    h.transitions.map((t) => ({
      step_id: t.step_id,
      from_state: t.from,
      to_state: t.to,
      event: t.event,
      attempt_id: t.attempt_id,
    })),
    rows.transitions.map(({ step_id, from_state, to_state, event, attempt_id }) => ({
      step_id,
      from_state,
      to_state,
      event,
      attempt_id,
    })),
  );
  assert.deepEqual(
    h.attempts.map((a) => ({
      attempt_id: a.attempt_id,
      step_id: a.step_id,
      attempt: a.attempt,
      pool_id: a.pool_id,
      outcome: a.outcome,
    })),
    rows.attempts,
  );
}

for (const transport of ["inproc", "tcp"] as Transport[]) {
  describe(`HISTORY: a task's transitions and attempts over the client protocol (${transport})`, function () {
    this.timeout(60_000);
    const stack = useBrokerStack(`history_${transport}`, transport);
    const cleanups: (() => unknown)[] = [];
    before(async () => {
      await stack.registerTemplate(DIAMOND);
    });
    afterEach(async () => {
      for (const c of cleanups.splice(0).reverse()) await c();
    });

    it("gives a diamond's every transition and attempt as the tables hold them, in snake_case", async () => {
      const pool = await startPool(stack, cleanups);
      const client = new StepbrokerClient({ endpoint: stack.endpoint, requestTimeoutMs: 20_000 });
      cleanups.push(() => client.close());
      const { task } = await client.submit({ namespace: NS, name: "diamond" }, { order: 7 });
      const done = await client.wait(task.task_id, 20_000);
      assert.equal(done.task.state, "complete");

      const out = await client.history(task.task_id);
      assert.equal(out.task.task_id, task.task_id);
      assert.equal(out.task.state, "complete");
      assert.deepEqual(
        out.task.steps?.map((s) => s.name),
        ["a", "b", "c", "d"],
        "the task comes with its steps, as STATUS gives it",
      );
      checkAgainstTables(out.history, await fromTables(stack, task.task_id));

      const b = out.task.steps!.find((s) => s.name === "b")!;
      const ofB = out.history.attempts.filter((a) => a.step_id === b.step_id);
      assert.deepEqual(
        ofB.map((a) => [a.attempt, a.outcome, a.error?.message ?? null]),
        [
          [1, "error", "first attempt fails on purpose"],
          [2, "complete", null],
        ],
      );
      for (const a of out.history.attempts) {
        assert.equal(a.pool_id, pool.poolId);
        assert.ok(a.finished_at && a.finished_at >= a.started_at, JSON.stringify(a));
        assert.equal(typeof a.duration_ms, "number");
      }
      const own = out.history.transitions.filter((t) => t.step_id === null);
      assert.deepEqual(own.at(-1)?.to, "complete", "the task's own transitions are there, step_id null");
      assert.ok(
        out.history.transitions.every((t) => !("stepId" in t)),
        "the wire names things as the rest of the protocol does",
      );
    });

    it("answers an unknown task with unknown_task carrying the request_id, and keeps serving", async () => {
      const client = new StepbrokerClient({ endpoint: stack.endpoint, requestTimeoutMs: 20_000 });
      cleanups.push(() => client.close());
      const missing = randomUUID();
      await assert.rejects(
        client.history(missing),
        (e: unknown) => e instanceof BrokerError && e.code === "unknown_task" && e.message.includes(missing),
      );
      const peer = RawPeer.connect(stack.endpoint);
      cleanups.push(() => peer.close());
      await peer.send("HISTORY", { request_id: "h-missing", task_id: missing });
      const err = await peer.next("ERROR", 10_000);
      assert.equal(err.body.code, "unknown_task");
      assert.equal(err.body.request_id, "h-missing");
      await peer.send("HISTORY", { request_id: "h-bad", task_id: "not-a-uuid" });
      const bad = await peer.next("ERROR", 10_000);
      assert.equal(bad.body.code, "schema_violation");
      assert.equal(bad.body.instance_path, "/task_id");

      await startPool(stack, cleanups);
      const { task } = await client.submit({ namespace: NS, name: "diamond" }, {});
      assert.equal((await client.wait(task.task_id, 20_000)).task.state, "complete");
    });
  });
}

describe("HISTORY: roles and size (tcp://127.0.0.1)", function () {
  this.timeout(90_000);
  const stack = useBrokerStack("history_roles", "tcp", { maxMessageBytes: MAX_BYTES });
  const cleanups: (() => unknown)[] = [];
  before(async () => {
    await stack.registerTemplate(DIAMOND);
    await stack.registerTemplate(LONG);
  });
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c();
  });

  it("sends reply_too_large for a history over max_message_bytes, while STATUS of the task still fits", async () => {
    await startPool(stack, cleanups);
    const client = new StepbrokerClient({ endpoint: stack.endpoint, requestTimeoutMs: 20_000 });
    cleanups.push(() => client.close());
    const { task } = await client.submit({ namespace: NS, name: "long" }, {});
    const done = await client.wait(task.task_id, 40_000);
    assert.equal(done.task.state, "error");
    assert.equal(done.task.steps?.[0]?.attempts, RETRIES);

    await assert.rejects(client.history(task.task_id), (e: unknown) => {
      assert.ok(e instanceof BrokerError, String(e));
      assert.equal(e.code, "reply_too_large");
      assert.match(
        e.message,
        new RegExp(`REPLY to HISTORY would be \\d+ bytes, over max_message_bytes ${MAX_BYTES}`),
      );
      assert.match(e.message, new RegExp(`task ${task.task_id} is error`));
      return true;
    });
    assert.equal((await client.status(task.task_id)).state, "error", "the smaller STATUS still fits");
    const { task: small } = await client.submit({ namespace: NS, name: "diamond" }, {});
    assert.equal((await client.wait(small.task_id, 20_000)).task.state, "complete");
    const ok = await client.history(small.task_id);
    assert.ok(ok.history.transitions.length > 0, "a small history is served after the refusal");
  });
  it("refuses HISTORY on the pool socket with forbidden when clients have their own, and serves it there", async () => {
    const b = await stack.startBroker({
      brokerId: `hist-roles-${randomUUID()}`,
      endpoints: ["tcp://127.0.0.1:*"],
      clientEndpoints: ["tcp://127.0.0.1:*"],
    });
    // Started last in this file: it replaces the stack's broker, whose socket serves every role.
    cleanups.push(() => b.stop({ drainMs: 0 }));
    const [poolEp, clientEp] = b.endpoints;
    const pool = new HandlerPool({
      endpoint: poolEp!,
      poolId: `hist-${randomUUID().slice(0, 8)}`,
      logger: silent,
    });
    pool.handle("echo", (step) => ({ name: step.stepName }));
    pool.handle("flaky", (step) => ({ name: step.stepName }));
    await pool.start();
    cleanups.push(() => pool.close({ drainMs: 500 }));
    const client = new StepbrokerClient({ endpoint: clientEp!, requestTimeoutMs: 20_000 });
    cleanups.push(() => client.close());
    const { task } = await client.submit({ namespace: NS, name: "diamond" }, {});
    assert.equal((await client.wait(task.task_id, 20_000)).task.state, "complete");

    const onPool = RawPeer.connect(poolEp!);
    cleanups.push(() => onPool.close());
    await onPool.send("HISTORY", { request_id: "h-pool", task_id: task.task_id });
    const refused = await onPool.next("ERROR", 10_000);
    assert.equal(refused.body.code, "forbidden");
    assert.equal(refused.body.request_id, "h-pool");
    assert.match(String(refused.body.message), /HISTORY is not allowed on the pool socket/);

    const out = await client.history(task.task_id);
    assert.equal(out.history.attempts.length, 4);
  });
});
