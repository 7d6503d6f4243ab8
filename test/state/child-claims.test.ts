/**
 * Children claimed in the transaction that stores their parent's result
 * (completeAttempts with a ChildClaim): what is claimed, for whom, how much,
 * and that the history reads as if a separate claim had taken them.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { StepStates } from "../../protocol/constants";
import type { ClaimedStep } from "../../broker/state/types";
import { useStateManager } from "../support/db";
import { assertInvariants } from "../support/invariants";

const DIAMOND = {
  namespace: "claims",
  name: "diamond",
  version: "1",
  steps: [
    { name: "a", handler: "h" },
    { name: "b", handler: "h", depends_on: ["a"] },
    { name: "c", handler: "other", depends_on: ["a"] },
    { name: "d", handler: "h", depends_on: ["b", "c"] },
  ],
};

describe("children claimed with their parent's result", () => {
  const t = useStateManager("child_claims");
  before(async () => {
    await t.sm.registerTemplate(DIAMOND);
  });

  /** A fresh diamond with its root claimed; returns the root's claim. */
  async function rootClaimed(): Promise<ClaimedStep> {
    const { task } = await t.sm.createTask({ namespace: "claims", name: "diamond", context: { n: 1 } });
    const [root] = await t.sm.claimSteps({
      brokerId: "b1",
      handlers: ["h"],
      limit: 10,
      stepIds: task.steps!.filter((s) => s.name === "a").map((s) => s.step_id),
    });
    assert.ok(root);
    return root;
  }

  it("counts each claimed step's children", async () => {
    const root = await rootClaimed();
    assert.equal(root.children, 2);
  });

  it("claims the readied children the pool serves, up to the limit, with their parents' outputs", async () => {
    const root = await rootClaimed();
    const out = await t.sm.completeAttempts(
      [{ attemptId: root.attempt_id, status: "complete", output: { from: "a" } }],
      { brokerId: "b1", poolId: "pool-1", handlers: ["h", "other"], limit: 5 },
    );
    assert.deepEqual(
      out.outcomes.map((o) => o.outcome),
      ["stored"],
    );
    assert.deepEqual(out.claimed.map((c) => c.step_name).sort(), ["b", "c"]);
    assert.deepEqual(out.readied, [], "a child claimed with the batch is not also reported ready");
    assert.deepEqual(out.finishedTasks, []);
    for (const c of out.claimed) {
      assert.deepEqual(c.inputs, { a: { from: "a" } });
      assert.deepEqual(c.context, { n: 1 });
      assert.equal(c.attempt, 1);
      assert.equal(c.children, 1);
      assert.ok(Date.parse(c.lease_expires_at) > Date.now(), "the lease runs from the claim");
    }
    const attempts = await t.sql<{ pool_id: string; broker_id: string }>(
      // running attempts live on their step's lease until they end
      `select lease_pool_id as pool_id, lease_broker_id as broker_id from steps where lease_attempt_id = any($1::uuid[])`,
      [out.claimed.map((c) => c.attempt_id)],
    );
    assert.deepEqual(
      attempts.map((a) => [a.broker_id, a.pool_id]),
      [
        ["b1", "pool-1"],
        ["b1", "pool-1"],
      ],
    );
    const history = await t.sql<{ to_state: string; event: string }>(
      `select tr.to_state, tr.event from step_transitions tr join steps s on s.id = tr.step_id
       where s.id = $1 order by tr.sort_key`,
      [out.claimed[0]!.step_id],
    );
    // the claim's own transition is written when the attempt ends (0016); until then the history
    // read shows it from the lease
    assert.deepEqual(
      history.map((h) => `${h.to_state}:${h.event}`),
      ["pending:created", "ready:parents_finished"],
    );
    const shown = (await t.sm.getTransitions(out.claimed[0]!.task_id)).filter(
      (tr) => tr.stepId === out.claimed[0]!.step_id,
    );
    assert.deepEqual(
      shown.map((tr) => [tr.to, tr.event, tr.attemptId, tr.metadata]),
      [
        ["pending", "created", null, null],
        ["ready", "parents_finished", null, null],
        ["in_progress", "claimed", out.claimed[0]!.attempt_id, { broker_id: "b1", attempt: 1 }],
      ],
    );
    await assertInvariants(t);
    await t.sm.completeAttempts([{ attemptId: out.claimed[0]!.attempt_id, status: "complete", output: 1 }]);
    const ended = await t.sql<{ to_state: string; event: string; attempt_id: string | null }>(
      `select to_state, event, attempt_id from step_transitions where step_id = $1 order by sort_key`,
      [out.claimed[0]!.step_id],
    );
    assert.deepEqual(
      ended.map((h) => [h.to_state, h.event, h.attempt_id]),
      [
        ["pending", "created", null],
        ["ready", "parents_finished", null],
        ["in_progress", "claimed", out.claimed[0]!.attempt_id],
        ["complete", "completed", out.claimed[0]!.attempt_id],
      ],
    );
    await assertInvariants(t);
  });

  it("leaves ready what the limit or the pool's handlers exclude, and reports it", async () => {
    const root = await rootClaimed();
    const out = await t.sm.completeAttempts(
      [{ attemptId: root.attempt_id, status: "complete", output: null }],
      { brokerId: "b1", poolId: "pool-1", handlers: ["h"], limit: 5 },
    );
    assert.deepEqual(
      out.claimed.map((c) => c.step_name),
      ["b"],
    );
    assert.equal(out.readied.length, 1);
    const [left] = await t.sql<{ name: string; state: string }>(
      `select name, state from steps where id = $1`,
      [out.readied[0]!.stepId],
    );
    assert.deepEqual(left, { name: "c", state: StepStates.READY });

    const again = await rootClaimed();
    const one = await t.sm.completeAttempts(
      [{ attemptId: again.attempt_id, status: "complete", output: null }],
      { brokerId: "b1", poolId: "pool-1", handlers: ["h", "other"], limit: 1 },
    );
    assert.equal(one.claimed.length, 1, "never more than the credit set aside");
    assert.equal(one.readied.length, 1);
    await assertInvariants(t);
  });

  it("claims nothing without a claim, and nothing for a failed result", async () => {
    const root = await rootClaimed();
    const failed = await t.sm.completeAttempts(
      [
        {
          attemptId: root.attempt_id,
          status: "error",
          error: { type: "Boom", message: "no", retryable: false },
        },
      ],
      { brokerId: "b1", poolId: "pool-1", handlers: ["h", "other"], limit: 5 },
    );
    assert.deepEqual(failed.claimed, []);
    assert.equal(failed.finishedTasks.length, 1, "the task ends: nothing else can run");

    const next = await rootClaimed();
    const plain = await t.sm.completeAttempts([
      { attemptId: next.attempt_id, status: "complete", output: null },
    ]);
    assert.deepEqual(plain.claimed, []);
    assert.equal(plain.readied.length, 2);
    await assertInvariants(t);
  });

  it("ends a task in the batch that stores its last step, even with a claim", async () => {
    const root = await rootClaimed();
    const first = await t.sm.completeAttempts(
      [{ attemptId: root.attempt_id, status: "complete", output: 1 }],
      { brokerId: "b1", poolId: "pool-1", handlers: ["h", "other"], limit: 2 },
    );
    const mid = await t.sm.completeAttempts(
      first.claimed.map((c) => ({
        attemptId: c.attempt_id,
        status: "complete" as const,
        output: c.step_name,
      })),
      { brokerId: "b1", poolId: "pool-1", handlers: ["h", "other"], limit: 2 },
    );
    assert.deepEqual(
      mid.claimed.map((c) => [c.step_name, c.inputs]),
      [["d", { b: "b", c: "c" }]],
    );
    const last = await t.sm.completeAttempts(
      [{ attemptId: mid.claimed[0]!.attempt_id, status: "complete", output: "d" }],
      { brokerId: "b1", poolId: "pool-1", handlers: ["h", "other"], limit: 2 },
    );
    assert.deepEqual(
      last.finishedTasks.map((f) => f.state),
      ["complete"],
    );
    await assertInvariants(t);
  });

  it("writes the claim's transition, at the attempt's end, for a child readied after the claim's statement began", async function () {
    this.timeout(20_000);
    const root = await rootClaimed();
    // A pick that waits before it looks: the claim's statement takes its snapshot, then the
    // parent's result commits, then the pick (with a snapshot of its own) sees the child ready.
    // Without a fresh snapshot for the history, the claim found no current transition to follow.
    // (plpgsql: each of its statements reads with a snapshot of its own.)
    await t.sql(`create or replace function pick_ready_steps(handlers text[], most integer, avoid uuid[] default null)
                 returns setof uuid
                 language plpgsql volatile set enable_sort = off as $$
                 begin
                   perform pg_sleep(2);
                   return query select s.id from steps s
                     where s.state = 'ready' and s.run_at <= now() and s.handler = any(handlers)
                       and (avoid is null or s.id <> all(avoid))
                     order by s.priority desc, s.run_at limit most for update skip locked;
                 end
                 $$`);
    // The parent's result starts first (so the child's run_at precedes the claim's now()) and
    // waits on its task's lock; the claim starts; the lock goes; the result commits; the pick wakes.
    const holder = await t.db.pool.connect();
    try {
      await holder.query("begin");
      await holder.query("select id from tasks where id = $1 for update", [root.task_id]);
      const completion = t.sm.completeAttempts([
        { attemptId: root.attempt_id, status: "complete", output: { from: "a" } },
      ]);
      await new Promise((r) => setTimeout(r, 200));
      const claim = t.sm.claimSteps({ brokerId: "b2", handlers: ["h"], limit: 1000 });
      await new Promise((r) => setTimeout(r, 300));
      await holder.query("commit");
      const out = await completion;
      assert.deepEqual(
        out.outcomes.map((o) => o.outcome),
        ["stored"],
      );
      const claimed = await claim;
      const b = claimed.find((c) => c.task_id === root.task_id && c.step_name === "b");
      assert.ok(
        b,
        `the delayed pick claimed child b (claimed: ${JSON.stringify(claimed.map((c) => [c.task_id, c.step_name]))}, root of ${root.task_id})`,
      );
      // its inputs are read after the pick too, in the same statement as the claim: the parent's output is there
      assert.deepEqual(b.inputs, { a: { from: "a" } });
      const history = await t.sql<{ from_state: string | null; to_state: string; event: string }>(
        `select from_state, to_state, event from step_transitions where step_id = $1 order by sort_key`,
        [b.step_id],
      );
      // the claim's transition comes with the attempt's end (0016)
      assert.deepEqual(
        history.map((h) => `${h.from_state ?? ""}>${h.to_state}`),
        [">pending", "pending>ready"],
      );
      await t.sm.completeAttempts([{ attemptId: b.attempt_id, status: "complete", output: 2 }]);
      const ended = await t.sql<{ from_state: string | null; to_state: string; event: string }>(
        `select from_state, to_state, event from step_transitions where step_id = $1 order by sort_key`,
        [b.step_id],
      );
      assert.deepEqual(
        ended.map((h) => `${h.from_state ?? ""}>${h.to_state}`),
        [">pending", "pending>ready", "ready>in_progress", "in_progress>complete"],
      );
    } finally {
      holder.release();
      await t.sql(readFileSync(new URL("../../sql/functions/pick_ready_steps.sql", import.meta.url), "utf8"));
    }
    await assertInvariants(t);
  });
});
