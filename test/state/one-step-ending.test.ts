/**
 * A one-step task ends in complete_results() itself (tasks.step_count, 0014),
 * without finalize_tasks() reading its steps: the task row, its transition and
 * the NOTIFY must be what finalize_tasks() writes, and every task the shortcut
 * does not cover (a failed step, a task a claim left pending, a task created
 * before 0014, a task of several steps) must still end through finalize_tasks().
 */
import assert from "node:assert/strict";
import pg from "pg";
import { connectionConfig } from "../../broker/db/openDatabase";
import { parseEventPayload } from "../../broker/state/EventNotifier";
import { databaseUrl, useStateManager } from "../support/db";
import { assertInvariants } from "../support/invariants";

interface TaskRow {
  state: string;
  step_count: number | null;
  history_seq: number;
  error: unknown;
}

describe("a one-step task ends with its step's result (0014)", function () {
  this.timeout(60_000);
  const t = useStateManager("one_step_ending");

  before(async () => {
    await t.sm.registerTemplate({
      namespace: "o",
      name: "one",
      version: "1",
      steps: [{ name: "s", handler: "o", retry: { max_attempts: 1 } }],
    });
    await t.sm.registerTemplate({
      namespace: "o",
      name: "two",
      version: "1",
      steps: [
        { name: "a", handler: "o" },
        { name: "b", handler: "o", depends_on: ["a"] },
      ],
    });
  });

  async function task(id: string): Promise<TaskRow> {
    const [row] = await t.sql<TaskRow>(
      `select state, step_count, history_seq, error from tasks where id = $1`,
      [id],
    );
    assert.ok(row, `task ${id} exists`);
    return row;
  }

  async function transitions(id: string): Promise<string[]> {
    const rows = await t.sql<{ move: string }>(
      `select coalesce(from_state, '-') || '>' || to_state || ':' || event as move
       from task_transitions where task_id = $1 order by sort_key`,
      [id],
    );
    return rows.map((r) => r.move);
  }

  it("counts each task's steps when it is created", async () => {
    const [one, two] = await t.sm.createTasks([
      { namespace: "o", name: "one", context: {} },
      { namespace: "o", name: "two", context: {} },
    ]);
    assert.ok(one && two);
    assert.equal((await task(one)).step_count, 1);
    assert.equal((await task(two)).step_count, 2);
    // leave nothing ready for the tests below
    await t.sql(`delete from tasks where id = any($1::uuid[])`, [[one, two]]);
  });

  it("ends a completed one-step task as finalize_tasks() would, NOTIFY included", async () => {
    const listener = new pg.Client(connectionConfig(databaseUrl(), t.schema));
    await listener.connect();
    try {
      const payloads: string[] = [];
      listener.on("notification", (n) => payloads.push(n.payload ?? ""));
      await listener.query(`listen "events_${t.schema}"`);

      const ids = await t.sm.createTasks(
        Array.from({ length: 3 }, (_, n) => ({ namespace: "o", name: "one", context: { n } })),
      );
      const claimed = await t.sm.claimSteps({ brokerId: "b1", handlers: ["o"], limit: 10 });
      assert.equal(claimed.length, 3);
      const done = await t.sm.completeAttempts(
        claimed.map((c) => ({ attemptId: c.attempt_id, status: "complete" as const, output: { ok: 1 } })),
      );
      assert.deepEqual(
        done.outcomes.map((o) => o.outcome),
        ["stored", "stored", "stored"],
      );
      assert.deepEqual(
        done.finishedTasks.map((f) => [f.taskId, f.state, f.error]).sort(),
        ids.map((id) => [id, "complete", null]).sort(),
      );
      for (const id of ids) {
        assert.deepEqual(await task(id), { state: "complete", step_count: 1, history_seq: 3, error: null });
        assert.deepEqual(await transitions(id), [
          "->pending:created",
          "pending>in_progress:started",
          "in_progress>complete:completed",
        ]);
      }
      // the NOTIFY is sent at commit: bounded wait for it
      const deadline = Date.now() + 10_000;
      while (payloads.length === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
      // read as every other broker reads them (EventNotifier)
      const told = payloads.flatMap((p) => parseEventPayload(p));
      assert.deepEqual(
        told.map((x) => (x.kind === "finished" ? [x.taskId, x.state] : [x.kind])).sort(),
        ids.map((id) => [id, "complete"]).sort(),
      );
      await assertInvariants(t);
    } finally {
      await listener.end();
    }
  });

  it("ends a one-step task whose step failed through finalize_tasks(), naming the step", async () => {
    const [id] = await t.sm.createTasks([{ namespace: "o", name: "one", context: {} }]);
    assert.ok(id);
    const [c] = await t.sm.claimSteps({ brokerId: "b1", handlers: ["o"], limit: 1 });
    assert.ok(c);
    const done = await t.sm.completeAttempts([
      {
        attemptId: c.attempt_id,
        status: "error",
        error: { type: "Boom", message: "boom", retryable: false },
      },
    ]);
    assert.deepEqual(done.finishedTasks, [
      { taskId: id, state: "error", error: { message: 'step "s" failed: boom', failed_steps: ["s"] } },
    ]);
    assert.equal((await task(id)).state, "error");
    await assertInvariants(t);
  });

  it("ends a one-step task that a claim left pending from pending, through finalize_tasks()", async () => {
    const [id] = await t.sm.createTasks([{ namespace: "o", name: "one", context: {} }]);
    assert.ok(id);
    // Another transaction holds the task row's lock while the step is claimed: the claim skips
    // the task (it never waits), so the task stays pending with its step in progress.
    const holder = new pg.Client(connectionConfig(databaseUrl(), t.schema));
    await holder.connect();
    let c;
    try {
      await holder.query("begin");
      await holder.query("select 1 from tasks where id = $1 for update", [id]);
      [c] = await t.sm.claimSteps({ brokerId: "b1", handlers: ["o"], limit: 1 });
      await holder.query("commit");
    } finally {
      await holder.end();
    }
    assert.ok(c);
    assert.equal((await task(id)).state, "pending");
    const done = await t.sm.completeAttempts([{ attemptId: c.attempt_id, status: "complete", output: null }]);
    assert.deepEqual(done.finishedTasks, [{ taskId: id, state: "complete", error: null }]);
    assert.deepEqual(await transitions(id), ["->pending:created", "pending>complete:completed"]);
    await assertInvariants(t);
  });

  it("ends a task created before 0014 (no step count) through finalize_tasks()", async () => {
    const [id] = await t.sm.createTasks([{ namespace: "o", name: "one", context: {} }]);
    assert.ok(id);
    await t.sql(`update tasks set step_count = null where id = $1`, [id]);
    const [c] = await t.sm.claimSteps({ brokerId: "b1", handlers: ["o"], limit: 1 });
    assert.ok(c);
    const done = await t.sm.completeAttempts([{ attemptId: c.attempt_id, status: "complete", output: 1 }]);
    assert.deepEqual(done.finishedTasks, [{ taskId: id, state: "complete", error: null }]);
    assert.deepEqual(await task(id), { state: "complete", step_count: null, history_seq: 3, error: null });
    await assertInvariants(t);
  });

  it("ends a task of two steps only with its last step, through finalize_tasks()", async () => {
    const [id] = await t.sm.createTasks([{ namespace: "o", name: "two", context: {} }]);
    assert.ok(id);
    const [a] = await t.sm.claimSteps({ brokerId: "b1", handlers: ["o"], limit: 10 });
    assert.ok(a);
    const first = await t.sm.completeAttempts([{ attemptId: a.attempt_id, status: "complete", output: 1 }]);
    assert.deepEqual(first.finishedTasks, []);
    assert.equal((await task(id)).state, "in_progress");
    const [b] = await t.sm.claimSteps({ brokerId: "b1", handlers: ["o"], limit: 10 });
    assert.ok(b);
    assert.equal(b.step_name, "b");
    const last = await t.sm.completeAttempts([{ attemptId: b.attempt_id, status: "complete", output: 2 }]);
    assert.deepEqual(last.finishedTasks, [{ taskId: id, state: "complete", error: null }]);
    await assertInvariants(t);
  });
});
