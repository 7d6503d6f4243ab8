import assert from "node:assert/strict";
import { AckOutcomes, StepStates, TaskStates } from "../../protocol/constants";
import { StateError } from "../../broker/state/errors";
import type { TaskView } from "../../broker/state/types";
import { useStateManager } from "../support/db";
import { type Behaviour, drive, echo } from "../support/drive";
import { assertInvariants } from "../support/invariants";
import {
  claim,
  createScenario,
  elapseBackoff,
  elapseLease,
  fail,
  handlersOf,
  scheduledDelayMs,
  stepState,
  succeed,
  taskState,
} from "../support/scenario";

/** Every handler of the scenario answers with `echo`. */
function handle(task: TaskView): Record<string, Behaviour> {
  return Object.fromEntries(handlersOf(task).map((h) => [h, echo]));
}

describe("failures, retries and operator actions", () => {
  const t = useStateManager("failures");
  afterEach(async () => await assertInvariants(t));

  it("retries a step that fails twice, then stores its third attempt's output", async () => {
    const task = await createScenario(t.sm, [{ name: "s", retry: { max_attempts: 3 } }]);
    for (const attempt of [1, 2]) {
      const [s] = await claim(t.sm, task, ["s"]);
      assert.ok(s);
      assert.equal(s.attempt, attempt);
      const res = await fail(t.sm, s);
      assert.equal(res.outcomes[0]?.outcome, AckOutcomes.STORED);
      assert.equal(res.outcomes[0]?.state, StepStates.READY);
      assert.deepEqual(
        res.readied.map((r) => r.stepId),
        [s.step_id],
        "the retry is reported as readied",
      );
      assert.deepEqual(res.finishedTasks, []);
    }
    const [s] = await claim(t.sm, task, ["s"]);
    assert.ok(s);
    assert.equal(s.attempt, 3);
    const res = await succeed(t.sm, s, { third: true });
    assert.deepEqual(res.finishedTasks, [{ taskId: task.task_id, state: TaskStates.COMPLETE, error: null }]);
    const view = await t.sm.getTask(task.task_id, { includeSteps: true });
    assert.deepEqual(view?.steps?.[0]?.output, { third: true });
    assert.equal(view?.steps?.[0]?.error, null, "the last error is cleared once the step completes");
    const attempts = await t.sm.getAttempts(s.step_id);
    assert.deepEqual(
      attempts.map((a) => [a.attempt, a.outcome]),
      [
        [1, "error"],
        [2, "error"],
        [3, "complete"],
      ],
    );
    assert.equal(new Set(attempts.map((a) => a.attemptId)).size, 3);
    assert.equal(attempts[0]?.error?.type, "Boom");
  });

  it("fails a step at once on an error that is not retryable, and the task names it", async () => {
    const task = await createScenario(t.sm, [
      { name: "pay", retry: { max_attempts: 5 } },
      { name: "ship", depends_on: ["pay"] },
    ]);
    const [pay] = await claim(t.sm, task, ["pay"]);
    assert.ok(pay);
    const res = await fail(t.sm, pay, {
      type: "PaymentDeclined",
      message: "card declined",
      retryable: false,
    });
    assert.equal(res.outcomes[0]?.state, StepStates.ERROR);
    assert.deepEqual(res.finishedTasks, [
      {
        taskId: task.task_id,
        state: TaskStates.ERROR,
        error: { message: 'step "pay" failed: card declined', failed_steps: ["pay"] },
      },
    ]);
    const view = await t.sm.getTask(task.task_id, { includeSteps: true });
    assert.equal(view?.state, TaskStates.ERROR);
    assert.deepEqual(view?.error?.failed_steps, ["pay"]);
    assert.equal(view?.steps?.[0]?.attempts, 1);
    assert.deepEqual(view?.steps?.[0]?.error, {
      type: "PaymentDeclined",
      message: "card declined",
      retryable: false,
    });
    assert.equal(view?.steps?.[1]?.state, StepStates.PENDING, "the dependent of a failed step stays pending");
  });

  it("fails a step when its attempts are exhausted", async () => {
    const task = await createScenario(t.sm, [{ name: "s", retry: { max_attempts: 2 } }]);
    const [first] = await claim(t.sm, task, ["s"]);
    assert.ok(first);
    await fail(t.sm, first);
    const [second] = await claim(t.sm, task, ["s"]);
    assert.ok(second);
    const res = await fail(t.sm, second, { message: "still broken" });
    assert.equal(res.outcomes[0]?.state, StepStates.ERROR);
    assert.equal(res.finishedTasks[0]?.state, TaskStates.ERROR);
    assert.deepEqual(await claim(t.sm, task, []), []);
    const [row] = await t.sm.explain(task.task_id);
    assert.equal(row?.conditions.find((c) => c.name === "attempts")?.ok, false);
    assert.equal(row?.conditions.find((c) => c.name === "attempts")?.detail, "2 of 2 used");
  });

  it("runs the first attempt of a step whose template forbids retries, and only that one", async () => {
    const task = await createScenario(t.sm, [
      { name: "once", retry: { retryable: false, max_attempts: 3 } },
      { name: "once_ok", retry: { retryable: false } },
    ]);
    const claimed = await claim(t.sm, task, ["once", "once_ok"]);
    const once = claimed.find((c) => c.step_name === "once");
    const ok = claimed.find((c) => c.step_name === "once_ok");
    assert.ok(once && ok);
    assert.equal(once.attempt, 1);
    await succeed(t.sm, ok, "done");
    const res = await fail(t.sm, once, { retryable: true });
    assert.equal(
      res.outcomes[0]?.state,
      StepStates.ERROR,
      "a retryable error does not override the template",
    );
    assert.equal(await stepState(t.sm, task, "once_ok"), StepStates.COMPLETE);
    assert.equal(await taskState(t.sm, task), TaskStates.ERROR);
  });

  it("times out an attempt whose lease expired, refuses its late result, and runs the retry", async () => {
    const task = await createScenario(t.sm, [{ name: "slow", timeout_ms: 1000, retry: { max_attempts: 2 } }]);
    const [first] = await claim(t.sm, task, ["slow"]);
    assert.ok(first);
    assert.deepEqual(await t.sm.expireLeases(), [], "a live lease is left alone");
    await elapseLease(t, first.step_id);
    const expired = await t.sm.expireLeases();
    assert.deepEqual(
      expired.map((e) => [e.attemptId, e.state, e.brokerId]),
      [[first.attempt_id, StepStates.READY, "b1"]],
    );
    assert.deepEqual(
      await t.sm.extendLeases([first.attempt_id]),
      [first.attempt_id],
      "the timed-out attempt holds no lease",
    );
    const late = await succeed(t.sm, first);
    assert.equal(late.outcomes[0]?.outcome, AckOutcomes.STALE);
    const [second] = await claim(t.sm, task, ["slow"]);
    assert.ok(second);
    assert.equal(second.attempt, 2);
    await elapseLease(t, second.step_id);
    const again = await t.sm.expireLeases({ brokerId: "b1" });
    assert.equal(again[0]?.state, StepStates.ERROR, "no attempt left after the second timeout");
    const view = await t.sm.getTask(task.task_id, { includeSteps: true });
    assert.equal(view?.state, TaskStates.ERROR);
    assert.equal(view?.steps?.[0]?.error?.type, "timeout");
    assert.match(view?.steps?.[0]?.error?.message ?? "", /attempt 2 of 2 timed out after 1000 ms/);
    const attempts = await t.sm.getAttempts(task.task_id);
    assert.deepEqual(
      attempts.map((a) => a.outcome),
      ["timeout", "timeout"],
    );
  });

  it("answers duplicate, stale and unknown results without changing anything", async () => {
    const task = await createScenario(t.sm, [{ name: "a" }, { name: "b" }]);
    const [a, b] = await claim(t.sm, task, ["a", "b"]);
    assert.ok(a && b);
    // the same attempt twice in one batch: the first copy counts
    const res = await t.sm.completeAttempts([
      { attemptId: a.attempt_id, status: "complete", output: 1 },
      { attemptId: a.attempt_id, status: "complete", output: 2 },
      { attemptId: "00000000-0000-4000-8000-000000000000", status: "complete", output: 3 },
      { attemptId: "not-a-uuid", status: "complete", output: 4 },
    ]);
    assert.deepEqual(
      res.outcomes.map((o) => o.outcome),
      ["stored", "duplicate", "unknown", "unknown"],
    );
    // and again later, even as an error
    const dup = await fail(t.sm, a);
    assert.equal(dup.outcomes[0]?.outcome, AckOutcomes.DUPLICATE);
    const view = await t.sm.getTask(task.task_id, { includeSteps: true });
    assert.equal(view?.steps?.[0]?.output, 1);
    // b's attempt loses its lease (given back: never delivered), then its result arrives
    await t.sm.releaseAttempts([b.attempt_id], { countAttempt: false, reason: "send failed" });
    const stale = await succeed(t.sm, b);
    assert.equal(stale.outcomes[0]?.outcome, AckOutcomes.STALE);
    assert.equal(await stepState(t.sm, task, "b"), StepStates.READY);
  });

  it("refuses a complete result without output rather than completing without one", async () => {
    const task = await createScenario(t.sm, [{ name: "a" }]);
    const [a] = await claim(t.sm, task, ["a"]);
    assert.ok(a);
    await assert.rejects(
      t.sm.completeAttempts([{ attemptId: a.attempt_id, status: "complete" }]),
      (err: unknown) => {
        assert.ok(err instanceof StateError);
        assert.equal(err.code, "invalid_request");
        return true;
      },
    );
    assert.equal(await stepState(t.sm, task, "a"), StepStates.IN_PROGRESS);
    await assert.rejects(
      t.sql(
        `update steps set state = 'complete', lease_attempt_id = null, lease_expires_at = null where id = $1`,
        [a.step_id],
      ),
      /steps_complete_has_output/,
      "the table itself refuses complete without output",
    );
  });

  it("cancels a task mid-way: unfinished steps cancelled, in-flight attempts returned, late results stale", async () => {
    const task = await createScenario(t.sm, [
      { name: "start" },
      { name: "left", depends_on: ["start"] },
      { name: "right", depends_on: ["start"] },
      { name: "join", depends_on: ["left", "right"] },
    ]);
    const [start] = await claim(t.sm, task, ["start"]);
    assert.ok(start);
    await succeed(t.sm, start);
    const [left] = await claim(t.sm, task, ["left"]);
    assert.ok(left);
    const { cancelledAttempts, state } = await t.sm.cancelTask(task.task_id);
    assert.deepEqual(cancelledAttempts, [left.attempt_id]);
    assert.equal(state, TaskStates.CANCELLED);
    const view = await t.sm.getTask(task.task_id, { includeSteps: true });
    assert.equal(view?.state, TaskStates.CANCELLED);
    assert.ok(view?.finished_at);
    assert.deepEqual(
      view?.steps?.map((s) => s.state),
      ["complete", "cancelled", "cancelled", "cancelled"],
    );
    assert.equal((await succeed(t.sm, left)).outcomes[0]?.outcome, AckOutcomes.STALE);
    assert.deepEqual(
      await t.sm.claimSteps({
        brokerId: "b1",
        handlers: handlersOf(task),
        limit: 10,
        stepIds: view?.steps?.map((s) => s.step_id) ?? [],
      }),
      [],
    );
    assert.deepEqual(await t.sm.cancelTask(task.task_id), {
      cancelledAttempts: [],
      state: TaskStates.CANCELLED,
    });
    await assert.rejects(
      t.sm.cancelTask("00000000-0000-4000-8000-000000000000"),
      (e: unknown) => e instanceof StateError && e.code === "unknown_task",
    );

    // an operator's retry of the cancelled task runs what was left
    const retried = await t.sm.retry({ taskId: task.task_id });
    assert.equal(retried.retried.length, 3);
    assert.deepEqual(
      retried.readied.map((r) => r.stepId).sort(),
      [view?.steps?.[1]?.step_id, view?.steps?.[2]?.step_id].sort(),
    );
    await drive(t.sm, { handlers: handle(task) });
    assert.equal(await taskState(t.sm, task), TaskStates.COMPLETE);
  });

  it("retries a failed task (all failed steps) or one failed step, attempts reset", async () => {
    const task = await createScenario(t.sm, [
      { name: "a", retry: { max_attempts: 1 } },
      { name: "b", depends_on: ["a"] },
    ]);
    const [a] = await claim(t.sm, task, ["a"]);
    assert.ok(a);
    await fail(t.sm, a);
    assert.equal(await taskState(t.sm, task), TaskStates.ERROR);
    await assert.rejects(t.sm.retry({ stepId: task.steps?.[1]?.step_id ?? "" }), /is not in error/);
    const { readied } = await t.sm.retry({ stepId: a.step_id });
    assert.deepEqual(
      readied.map((r) => r.stepId),
      [a.step_id],
    );
    const view = await t.sm.getTask(task.task_id, { includeSteps: true });
    assert.equal(view?.state, TaskStates.IN_PROGRESS);
    assert.equal(view?.finished_at, null);
    assert.equal(view?.error, null);
    assert.equal(view?.steps?.[0]?.attempts, 0);
    const [again] = await claim(t.sm, task, ["a"]);
    assert.equal(again?.attempt, 1);
    assert.ok(again);
    await fail(t.sm, again);
    await t.sm.retry({ taskId: task.task_id });
    await drive(t.sm, { handlers: handle(task) });
    assert.equal(await taskState(t.sm, task), TaskStates.COMPLETE);
    await assert.rejects(t.sm.retry({ taskId: task.task_id }), /complete, nothing to retry/);
  });

  it("unblocks dependents when an operator resolves a failed step, with or without an output", async () => {
    const task = await createScenario(t.sm, [
      { name: "a", retry: { max_attempts: 1 } },
      { name: "b", depends_on: ["a"] },
      { name: "c", depends_on: ["b"] },
    ]);
    const [a] = await claim(t.sm, task, ["a"]);
    assert.ok(a);
    await fail(t.sm, a);
    assert.equal(await taskState(t.sm, task), TaskStates.ERROR);
    const explained = await t.sm.explain(task.task_id);
    assert.equal(explained[1]?.blockedBy, "parents");
    assert.equal(explained[1]?.conditions[0]?.detail, 'blocked by failed parent "a" (error)');
    assert.equal(
      explained[2]?.conditions[0]?.detail,
      'waiting for "b" (pending), which is blocked by failed step "a"',
    );
    // c is pending but not directly blocked by a failed parent: it is blocked through b, so it may be resolved too;
    // a pending step with nothing failed above it may not
    const resolved = await t.sm.resolveStep(a.step_id, { fixed: "by hand" });
    assert.deepEqual(
      resolved.readied.map((r) => r.stepId),
      [task.steps?.[1]?.step_id],
    );
    assert.deepEqual(resolved.finishedTasks, []);
    assert.equal(await taskState(t.sm, task), TaskStates.IN_PROGRESS);
    await assert.rejects(t.sm.resolveStep(task.steps?.[2]?.step_id ?? ""), /not blocked by a failed step/);
    const [b] = await claim(t.sm, task, ["b"]);
    assert.deepEqual(b?.inputs, { a: { fixed: "by hand" } });
    assert.ok(b);
    await succeed(t.sm, b);
    const log = await drive(t.sm, { handlers: handle(task) });
    assert.equal(log.claimed.length, 1);
    assert.equal(await taskState(t.sm, task), TaskStates.COMPLETE);
  });

  it("resolves a pending step blocked by a failure, its children get null as its output", async () => {
    const task = await createScenario(t.sm, [
      { name: "a", retry: { max_attempts: 1 } },
      { name: "b", depends_on: ["a"] },
      { name: "c", depends_on: ["b"] },
    ]);
    const [a] = await claim(t.sm, task, ["a"]);
    assert.ok(a);
    await fail(t.sm, a);
    const resolved = await t.sm.resolveStep(task.steps?.[1]?.step_id ?? "");
    assert.deepEqual(
      resolved.readied.map((r) => r.stepId),
      [task.steps?.[2]?.step_id],
    );
    const [c] = await claim(t.sm, task, ["c"]);
    assert.deepEqual(c?.inputs, { b: null });
    assert.ok(c);
    const done = await succeed(t.sm, c);
    // a is still in error: the task fails again, naming it
    assert.deepEqual(
      done.finishedTasks.map((f) => [f.state, f.error?.failed_steps]),
      [[TaskStates.ERROR, ["a"]]],
    );
    const final = await t.sm.resolveStep(a.step_id, null);
    assert.deepEqual(
      final.finishedTasks.map((f) => f.state),
      [TaskStates.COMPLETE],
    );
  });

  it("ends a fan-in whose parent failed in error naming that parent, after an independent branch ran to its end", async () => {
    const task = await createScenario(t.sm, [
      { name: "p1", retry: { max_attempts: 1 } },
      { name: "p2" },
      { name: "join", depends_on: ["p1", "p2"] },
      { name: "x1" },
      { name: "x2", depends_on: ["x1"] },
    ]);
    const claimed = await claim(t.sm, task, ["p1", "p2", "x1"]);
    const byName = new Map(claimed.map((c) => [c.step_name, c]));
    const res = await t.sm.completeAttempts([
      {
        attemptId: byName.get("p1")?.attempt_id ?? "",
        status: "error",
        error: { type: "E", message: "p1 exploded", retryable: true },
      },
      { attemptId: byName.get("p2")?.attempt_id ?? "", status: "complete", output: "p2" },
      { attemptId: byName.get("x1")?.attempt_id ?? "", status: "complete", output: "x1" },
    ]);
    assert.deepEqual(
      res.outcomes.map((o) => o.outcome),
      ["stored", "stored", "stored"],
    );
    assert.deepEqual(res.finishedTasks, [], "x2 can still run, so the task is not finished");
    assert.deepEqual(
      res.readied.map((r) => r.stepId),
      [task.steps?.[4]?.step_id],
      "join is not readied: p1 failed",
    );
    assert.equal(await taskState(t.sm, task), TaskStates.IN_PROGRESS);
    const [x2] = await claim(t.sm, task, ["x2"]);
    assert.ok(x2);
    const end = await succeed(t.sm, x2);
    assert.deepEqual(end.finishedTasks, [
      {
        taskId: task.task_id,
        state: TaskStates.ERROR,
        error: { message: 'step "p1" failed: p1 exploded', failed_steps: ["p1"] },
      },
    ]);
    const view = await t.sm.getTask(task.task_id, { includeSteps: true });
    assert.deepEqual(
      view?.steps?.map((s) => s.state),
      ["error", "complete", "pending", "complete", "complete"],
    );
    const join = (await t.sm.explain(task.task_id)).find((r) => r.name === "join");
    assert.equal(join?.blockedBy, "parents");
    assert.match(join?.conditions[0]?.detail ?? "", /blocked by failed parent "p1"/);
  });

  it("waits the handler's retry_after_ms before the next attempt: not claimable until run_at", async () => {
    const task = await createScenario(t.sm, [{ name: "s", retry: { max_attempts: 3 } }]);
    const [s] = await claim(t.sm, task, ["s"]);
    assert.ok(s);
    const res = await fail(t.sm, s, { retry_after_ms: 60_000 });
    assert.equal(res.outcomes[0]?.state, StepStates.READY);
    assert.equal(await scheduledDelayMs(t, s.step_id), 60_000);
    assert.ok(
      Date.parse(res.readied[0]?.runAt ?? "") > Date.now(),
      "the readied step reports its future run_at",
    );
    const [stored] = await t.sql<{ run_at: Date }>(`select run_at from steps where id = $1`, [s.step_id]);
    assert.equal(res.readied[0]?.runAt, stored?.run_at.toISOString(), "as toISOString writes it");
    assert.deepEqual(
      await t.sm.claimSteps({ brokerId: "b1", handlers: handlersOf(task), limit: 10, stepIds: [s.step_id] }),
      [],
    );
    const [row] = await t.sm.explain(task.task_id);
    assert.equal(row?.blockedBy, "backoff");
    await elapseBackoff(t, s.step_id);
    const [again] = await t.sm.claimSteps({
      brokerId: "b1",
      handlers: handlersOf(task),
      limit: 10,
      stepIds: [s.step_id],
    });
    assert.equal(again?.attempt, 2);
  });

  it("backs off exponentially up to the cap, with jitter shortening each delay by at most its fraction", async () => {
    const task = await createScenario(t.sm, [
      {
        name: "exp",
        retry: { max_attempts: 5, backoff: { initial_ms: 1000, multiplier: 2, max_ms: 3000, jitter: 0 } },
      },
      {
        name: "jit",
        retry: { max_attempts: 2, backoff: { initial_ms: 1000, multiplier: 2, max_ms: 3000, jitter: 0.5 } },
      },
    ]);
    const delays: number[] = [];
    for (let i = 0; i < 4; i++) {
      const [s] = await claim(t.sm, task, ["exp"]);
      assert.ok(s);
      await fail(t.sm, s);
      delays.push(await scheduledDelayMs(t, s.step_id));
      await elapseBackoff(t, s.step_id);
    }
    assert.deepEqual(delays, [1000, 2000, 3000, 3000]);
    const [j] = await claim(t.sm, task, ["jit"]);
    assert.ok(j);
    await fail(t.sm, j);
    const jittered = await scheduledDelayMs(t, j.step_id);
    assert.ok(jittered >= 500 && jittered <= 1000, `jittered delay ${jittered}`);
  });

  it("creates a task once per idempotency key, also when requests race", async () => {
    const task = await createScenario(t.sm, [{ name: "s" }]);
    const template = task.template;
    const first = await t.sm.createTask({ ...template, context: { n: 1 }, idempotencyKey: "order-1" });
    const second = await t.sm.createTask({ ...template, context: { n: 2 }, idempotencyKey: "order-1" });
    assert.equal(first.created, true);
    assert.equal(second.created, false);
    assert.equal(second.task.task_id, first.task.task_id);
    assert.deepEqual(second.task.context, { n: 1 });
    assert.equal(second.task.idempotency_key, "order-1");

    const racing = await Promise.all(
      Array.from({ length: 8 }, (_, i) =>
        t.sm.createTask({ ...template, context: { i }, idempotencyKey: "race" }),
      ),
    );
    assert.equal(racing.filter((r) => r.created).length, 1);
    assert.equal(new Set(racing.map((r) => r.task.task_id)).size, 1);

    const batch = await t.sm.createTasks([
      { ...template, context: {}, idempotencyKey: "b1" },
      { ...template, context: {}, idempotencyKey: "b1" },
      { ...template, context: {}, idempotencyKey: "order-1" },
      { ...template, context: {} },
    ]);
    assert.equal(batch[0], batch[1]);
    assert.equal(batch[2], first.task.task_id);
    assert.equal(new Set(batch).size, 3);
    const [count] = await t.sql<{ n: number }>(
      `select count(*)::int as n from tasks where idempotency_key in ('order-1', 'race', 'b1')`,
    );
    assert.equal(count?.n, 3);
  });
});
