/**
 * The operators' reads (DashboardReads, behind the StateManager) on a
 * database with real history: what they count, and that each stays on an
 * index, so a dashboard left open, or a Prometheus scrape every few seconds,
 * does not read whole tables while the broker works.
 */
import assert from "node:assert/strict";
import { loadQueries } from "../../broker/db/queries";
import { useStateManager } from "../support/db";

describe("DashboardReads on a database with history", function () {
  this.timeout(60_000);
  const t = useStateManager("dashboard_reads");
  let taskIds: string[] = [];

  before(async function () {
    this.timeout(60_000);
    await t.sm.registerTemplate({
      namespace: "d",
      name: "pair",
      version: "1",
      steps: [
        { name: "first", handler: "h1" },
        { name: "second", handler: "h2", depends_on: ["first"] },
      ],
    });
    await t.sm.registerTemplate({
      namespace: "d",
      name: "lone",
      version: "1",
      steps: [{ name: "x", handler: "h3" }],
    });
    taskIds = await t.sm.createTasks(
      Array.from({ length: 3000 }, (_, n) => ({
        namespace: "d",
        name: "pair",
        context: { n, tag: `t${n % 7}` },
      })),
    );
    await t.sm.createTasks([{ namespace: "d", name: "lone", context: { tag: "single" } }]);
    const claimed = await t.sm.claimSteps({ brokerId: "b", handlers: ["h1"], limit: 1000 });
    await t.sm.completeAttempts(
      claimed
        .slice(0, 600)
        .map((c) => ({ attemptId: c.attempt_id, status: "complete" as const, output: { ok: 1 } })),
    );
    await t.sm.completeAttempts(
      claimed.slice(600, 700).map((c) => ({
        attemptId: c.attempt_id,
        status: "error" as const,
        error: { type: "Refused", message: "no", retryable: false },
      })),
    );
    // plans as they are on a busy broker's tables: with statistics
    for (const table of ["tasks", "steps", "step_attempts", "step_transitions", "task_transitions"])
      await t.sql(`analyze ${table}`);
  });

  it("counts ready steps per handler with the oldest one's age", async () => {
    const rows = await t.sm.queueDepth();
    // h1: 3000 roots, 1000 claimed; h2: children of the 600 completed; h3: the lone task
    assert.deepEqual(
      rows.map((r) => [r.handler, r.ready]),
      [
        ["h1", 2000],
        ["h2", 600],
        ["h3", 1],
      ],
    );
    for (const r of rows)
      assert.ok(r.oldestAgeSeconds >= 0 && r.oldestAgeSeconds < 120, `${r.oldestAgeSeconds}`);
  });

  it("counts attempts finished in the last minutes by outcome", async () => {
    const rows = await t.sm.throughput(5);
    const total = (outcome: string) =>
      rows.filter((r) => r.outcome === outcome).reduce((n, r) => n + r.count, 0);
    assert.equal(total("complete"), 600);
    assert.equal(total("error"), 100);
    for (const r of rows) assert.match(r.minute, /:00\.000Z$/);
  });

  it("pages and filters the task list", async () => {
    const first = await t.sm.listTasks({ template: "d/pair", limit: 100 });
    assert.equal(first.tasks.length, 100);
    const second = await t.sm.listTasks({ template: "d/pair", limit: 100, before: first.next! });
    // newest first by the time-ordered id (ids of one millisecond sort by their random bits)
    const ids = [...first.tasks, ...second.tasks].map((x) => x.task_id);
    assert.deepEqual([...ids].sort().reverse(), ids);
    assert.equal(new Set(ids).size, 200);
    assert.deepEqual(ids, [...taskIds].sort().reverse().slice(0, 200));
    const tagged = await t.sm.listTasks({ text: "SINGLE" });
    assert.equal(tagged.tasks.length, 1);
    assert.equal(tagged.tasks[0]!.template.name, "lone");
    assert.equal(tagged.next, null);
    const failed = await t.sm.listTasks({ state: "error", limit: 500 });
    assert.equal(failed.tasks.length, 100);
  });

  it("reads a task's transitions oldest first, the task's own among its steps'", async () => {
    const rows = await t.sm.getTransitions(taskIds[0]!);
    assert.ok(rows.length >= 3);
    assert.deepEqual(
      [...rows].sort((a, b) => a.at.localeCompare(b.at)),
      rows,
    );
    assert.ok(rows.some((r) => r.stepName === null && r.to === "pending"));
    assert.ok(rows.some((r) => r.stepName === "first" && r.to === "in_progress"));
    assert.deepEqual(await t.sm.getTransitions("not-a-uuid"), []);
  });

  async function plan(name: keyof ReturnType<typeof loadQueries>, values: unknown[]): Promise<string> {
    const text = loadQueries()[name].text;
    const rows = await t.sql<{ "QUERY PLAN": string }>(`explain ${text}`, values);
    return rows.map((r) => r["QUERY PLAN"]).join("\n");
  }

  it("stays on indexes: the ready index, the attempts' time-ordered key, the transitions' key", async () => {
    const queue = await plan("queue_depth", []);
    assert.match(queue, /steps_ready/, queue);
    assert.doesNotMatch(queue, /Seq Scan on steps/, queue);
    // here every attempt is recent, so scanning them all would be right; a bound past all of them
    // (as on a broker with hours of history behind the window) must walk the key's recent end
    const h = (Date.now() + 60_000).toString(16).padStart(12, "0");
    const tp = await plan("throughput", [`${h.slice(0, 8)}-${h.slice(8)}-7000-8000-000000000000`, 15]);
    // step_attempts is partitioned by time (0013): each partition is read by its own key
    assert.match(tp, /Index Scan using step_attempts_\w+_pkey/, tp);
    assert.doesNotMatch(tp, /Seq Scan on step_attempts_(legacy|p\d)/, tp);
    const tr = await plan("get_transitions", [taskIds[0]]);
    assert.match(tr, /step_transitions_\w+_pkey/, tr);
    assert.match(tr, /task_transitions_\w+_pkey/, tr);
    // (the default partition, empty while the broker creates partitions ahead, may be scanned)
    assert.doesNotMatch(tr, /Seq Scan on step_transitions_(legacy|p\d)/, tr);
    const page = await plan("list_tasks", [null, null, null, null, 51]);
    assert.match(page, /Index Scan Backward using tasks_pkey/, page);
  });
});
