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

  it("gives a child claimed with its last parent's result the STEP fields claim_steps gives it", async () => {
    // two parents (one with an output, one without), a child with a child of its own, a step config,
    // a timeout, retries and a trace context: every STEP field of the claimed child has a value to get wrong
    await t.sm.registerTemplate({
      namespace: "claims",
      name: "join",
      version: "1",
      steps: [
        { name: "p1", handler: "h" },
        { name: "p2", handler: "h" },
        {
          name: "j",
          handler: "h",
          depends_on: ["p1", "p2"],
          config: { mode: "join", n: [1, 2] },
          timeout_ms: 45_000,
          retry: { max_attempts: 4 },
        },
        { name: "after", handler: "h", depends_on: ["j"] },
      ],
    });
    const traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const claimJoin = async (withCommit: boolean, together: boolean): Promise<ClaimedStep> => {
      const { task } = await t.sm.createTask({
        namespace: "claims",
        name: "join",
        context: { order: 7, tags: ["x"] },
        traceparent,
        tracestate: "vendor=1",
      });
      const idOf = (name: string): string => task.steps!.find((s) => s.name === name)!.step_id;
      const parents = await t.sm.claimSteps({
        brokerId: "b1",
        poolId: "pool-1",
        handlers: ["h"],
        limit: 10,
        stepIds: [idOf("p1"), idOf("p2")],
      });
      const attemptOf = (name: string): string => parents.find((p) => p.step_name === name)!.attempt_id;
      const claim = withCommit ? { brokerId: "b1", poolId: "pool-1", handlers: ["h"], limit: 5 } : undefined;
      const p1 = {
        attemptId: attemptOf("p1"),
        status: "complete" as const,
        output: { rows: [1, { deep: true }] },
      };
      const p2 = { attemptId: attemptOf("p2"), status: "complete" as const, output: null };
      let out;
      if (together) out = await t.sm.completeAttempts([p1, p2], claim);
      else {
        // the first parent's output is stored by an earlier call, the second's by the claiming one
        const first = await t.sm.completeAttempts([p1], claim);
        assert.deepEqual(first.claimed, [], "the child waits for its second parent");
        out = await t.sm.completeAttempts([p2], claim);
      }
      if (withCommit) {
        assert.deepEqual(out.readied, []);
        assert.equal(out.claimed.length, 1);
        return out.claimed[0]!;
      }
      assert.deepEqual(
        out.readied.map((r) => r.stepId),
        [idOf("j")],
      );
      const [claimed] = await t.sm.claimSteps({
        brokerId: "b1",
        poolId: "pool-1",
        handlers: ["h"],
        limit: 5,
        stepIds: [idOf("j")],
      });
      assert.ok(claimed);
      return claimed;
    };
    const byClaim = await claimJoin(false, true);
    // the fields that differ from task to task, and the lease, which runs from each claim's own now()
    const same = (c: ClaimedStep): Partial<ClaimedStep> => {
      const { task_id: _t, step_id: _s, attempt_id: _a, lease_expires_at: _l, ...rest } = c;
      return rest;
    };
    assert.deepEqual(same(byClaim), {
      step_name: "j",
      handler: "h",
      attempt: 1,
      max_attempts: 4,
      timeout_ms: 45_000,
      template: { namespace: "claims", name: "join", version: "1" },
      context: { order: 7, tags: ["x"] },
      config: { mode: "join", n: [1, 2] },
      inputs: { p1: { rows: [1, { deep: true }] }, p2: null },
      children: 1,
      traceparent,
      tracestate: "vendor=1",
    });
    for (const together of [true, false]) {
      const before = Date.now();
      const byCommit = await claimJoin(true, together);
      assert.deepEqual(
        same(byCommit),
        same(byClaim),
        `parents' results ${together ? "in one call" : "in two calls"}`,
      );
      // the lease is written as claim_steps writes it (toISOString) and runs timeout_ms from the claim
      assert.match(byCommit.lease_expires_at, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
      assert.ok(Date.parse(byCommit.lease_expires_at) >= before + 45_000 - 1_000, byCommit.lease_expires_at);
      const [row] = await t.sql<{ lease_attempt_id: string; lease_expires_at: Date }>(
        "select lease_attempt_id, lease_expires_at from steps where id = $1",
        [byCommit.step_id],
      );
      assert.equal(row?.lease_attempt_id, byCommit.attempt_id);
      assert.equal(row?.lease_expires_at.toISOString(), byCommit.lease_expires_at);
    }
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
