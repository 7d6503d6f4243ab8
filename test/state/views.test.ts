import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { Ajv2020 } from "ajv/dist/2020.js";
import { TaskStates } from "../../protocol/constants";
import { formatExplain } from "../../broker/state/explain";
import { StateManager } from "../../broker/state/StateManager";
import type { WorkNotification } from "../../broker/state/types";
import { useStateManager } from "../support/db";
import { claim, createScenario, fail, succeed } from "../support/scenario";

const common: unknown = JSON.parse(
  readFileSync(new URL("../../protocol/schemas/common.json", import.meta.url), "utf8"),
);
const ajv = new Ajv2020({ strict: false });
ajv.addSchema(common as object);
const validateTaskView = ajv.getSchema("urn:stepbroker:1:common#/$defs/task_view");

function assertTaskView(view: unknown): void {
  assert.ok(validateTaskView, "common.json defines task_view");
  assert.ok(validateTaskView(view), JSON.stringify(validateTaskView.errors));
}

describe("views: task_view, attempts, explain, notifications", () => {
  const t = useStateManager("views");

  it("returns task views that match the protocol's task_view schema at every stage", async () => {
    const task = await createScenario(
      t.sm,
      [
        { name: "a", retry: { max_attempts: 1 } },
        { name: "b", depends_on: ["a"] },
      ],
      { order: 42 },
    );
    assertTaskView(task);
    assertTaskView(await t.sm.getTask(task.task_id));
    const [a] = await claim(t.sm, task, ["a"]);
    assert.ok(a);
    assertTaskView(await t.sm.getTask(task.task_id, { includeSteps: true }));
    await fail(t.sm, a, { details: { code: 7 } });
    const failed = await t.sm.getTask(task.task_id, { includeSteps: true });
    assertTaskView(failed);
    assert.equal(failed?.state, TaskStates.ERROR);
    assert.deepEqual(failed?.steps?.[1]?.depends_on, ["a"]);
    assert.equal(await t.sm.getTask("00000000-0000-4000-8000-000000000000"), null);
    assert.equal(await t.sm.getTask("nope"), null);
  });

  it("keeps one attempt row per attempt with duration, pool and usage", async () => {
    const task = await createScenario(t.sm, [{ name: "a" }]);
    const [a] = await claim(t.sm, task, ["a"]);
    assert.ok(a);
    await t.sm.completeAttempts([
      {
        attemptId: a.attempt_id,
        status: "complete",
        output: { text: "héllo" },
        durationMs: 12.5,
        poolId: "pool-7",
        usage: { cost: 0.25, tokens: 1200, artifacts: ["s3://bucket/a.txt"] },
      },
    ]);
    const [row] = await t.sm.getAttempts(a.step_id);
    assert.ok(row);
    assert.equal(row.attemptId, a.attempt_id);
    assert.equal(row.stepName, "a");
    assert.equal(row.outcome, "complete");
    assert.equal(row.durationMs, 12.5);
    assert.equal(row.poolId, "pool-7");
    assert.equal(row.brokerId, "b1");
    assert.equal(row.outputBytes, Buffer.byteLength(JSON.stringify({ text: "héllo" })));
    assert.deepEqual(row.usage, { cost: 0.25, tokens: 1200, artifacts: ["s3://bucket/a.txt"] });
    assert.ok(row.finishedAt !== null && row.finishedAt >= row.startedAt);
    await assert.rejects(
      t.sql(`update step_attempts set outcome = 'error' where attempt_id = $1`, [a.attempt_id]),
      /append-only/,
      "a finished attempt cannot be rewritten",
    );
  });

  it("explains every readiness condition of every step and names what blocks it", async () => {
    const task = await createScenario(t.sm, [
      { name: "running" },
      { name: "waiting", depends_on: ["running"] },
      { name: "unserved", handler: "nobody_serves_this" },
    ]);
    const [running] = await claim(t.sm, task, ["running"]);
    assert.ok(running);
    const served = new Set([running.handler]);
    const rows = await t.sm.explain(task.task_id, { servedHandlers: served });
    const by = new Map(rows.map((r) => [r.name, r]));
    assert.equal(by.get("running")?.blockedBy, "state");
    assert.equal(by.get("running")?.conditions.find((c) => c.name === "lease")?.ok, false);
    assert.match(
      by.get("running")?.conditions.find((c) => c.name === "lease")?.detail ?? "",
      new RegExp(`held by attempt ${running.attempt_id} of broker b1 until`),
    );
    assert.equal(by.get("waiting")?.blockedBy, "parents");
    assert.equal(by.get("waiting")?.conditions[0]?.detail, 'waiting for "running" (in_progress)');
    assert.equal(by.get("unserved")?.blockedBy, "pool");
    assert.equal(
      by.get("unserved")?.conditions.find((c) => c.name === "pool")?.detail,
      'no connected pool serves handler "nobody_serves_this"',
    );
    assert.deepEqual(
      by.get("unserved")?.conditions.map((c) => c.name),
      ["parents", "state", "attempts", "backoff", "lease", "pool"],
    );
    await succeed(t.sm, running);
    const after = await t.sm.explain(task.task_id);
    assert.equal(after.find((r) => r.name === "waiting")?.blockedBy, null, "ready and dispatchable");
    assert.equal(
      after.find((r) => r.name === "unserved")?.blockedBy,
      null,
      "without servedHandlers the pool is not judged",
    );

    const text = formatExplain(rows);
    const lines = text.split("\n");
    assert.match(lines[0] ?? "", /^STEP\s+HANDLER\s+STATE\s+ATTEMPTS\s+BLOCKED BY\s+WHY$/);
    assert.match(
      lines[2] ?? "",
      /^waiting\s+\S+\s+pending\s+0\/3\s+parents\s+waiting for "running" \(in_progress\)$/,
    );
    assert.match(
      formatExplain(rows, { verbose: true }),
      /FAIL pool +no connected pool serves handler "nobody_serves_this"/,
    );
    await assert.rejects(t.sm.explain("00000000-0000-4000-8000-000000000000"), /no task/);
  });

  it("notifies listeners when another process creates work, and of its own changes once", async () => {
    const task = await createScenario(t.sm, [{ name: "a", retry: { max_attempts: 1 } }]);
    // A second state manager on the same schema stands for another process: its changes arrive by NOTIFY.
    const other = new StateManager(t.sm.db);
    const seen: WorkNotification[] = [];
    let wake: () => void = () => {};
    const stop = await t.sm.listenForWork((n) => {
      seen.push(n);
      wake();
    });
    try {
      const next = (): Promise<void> => new Promise((resolve) => (wake = resolve));
      let arrived = next();
      await other.createTask({ ...task.template, context: {} });
      await arrived;
      assert.deepEqual(seen, [{ reason: "created" }]);

      // Our own change: the listener is called before createTask returns, and its NOTIFY is skipped.
      await t.sm.createTask({ ...task.template, context: {} });
      assert.deepEqual(seen.length, 2);
      // Notifications arrive in commit order: had our own echo not been skipped, it would come before this one.
      arrived = next();
      await other.createTask({ ...task.template, context: {} });
      await arrived;
      assert.equal(seen.length, 3);

      const [a] = await claim(t.sm, task, ["a"]);
      assert.ok(a);
      await fail(t.sm, a);
      arrived = next();
      await other.retry({ stepId: a.step_id });
      await arrived;
      assert.deepEqual(seen.at(-1), { reason: "retried" });
      assert.equal(seen.length, 4);
    } finally {
      await stop();
    }
    // Stopped: neither path calls it any more.
    await t.sm.createTask({ ...task.template, context: {} });
    assert.equal(seen.length, 4);
  });

  it("listens again after its connection is cut, and says it may have missed work", async () => {
    const task = await createScenario(t.sm, [{ name: "a" }]);
    const other = new StateManager(t.sm.db);
    const seen: WorkNotification[] = [];
    let wake: () => void = () => {};
    const next = (): Promise<void> => new Promise((resolve) => (wake = resolve));
    const stop = await t.sm.listenForWork((n) => {
      seen.push(n);
      wake();
    });
    // The listening connection is the one whose last statement was LISTEN on this schema's channel.
    const listening = `listen "${t.sm.workChannel}"`;
    const cutListener = async (): Promise<boolean[]> =>
      (
        await t.sm.db.pool.query<{ ok: boolean }>(
          "select pg_terminate_backend(pid) as ok from pg_stat_activity where query = $1 and pid <> pg_backend_pid()",
          [listening],
        )
      ).rows.map((r) => r.ok);
    try {
      assert.deepEqual(await cutListener(), [true]);
      let arrived = next();
      await arrived;
      assert.deepEqual(seen, [{ reason: "reconnected" }]);

      // Listening again: another process's work arrives by NOTIFY as before.
      arrived = next();
      await other.createTask({ ...task.template, context: {} });
      await arrived;
      assert.deepEqual(seen.at(-1), { reason: "created" });

      // Stopped while a reconnect is due: it never happens, and no connection is left listening.
      assert.deepEqual(await cutListener(), [true]);
    } finally {
      await stop();
    }
    await new Promise((resolve) => setTimeout(resolve, 500));
    const left = await t.sm.db.pool.query("select pid from pg_stat_activity where query = $1", [listening]);
    assert.equal(left.rowCount, 0);
    assert.equal(seen.length, 2);
  });
});
