import assert from "node:assert/strict";
import { StepStates, TaskStates } from "../../protocol/constants";
import { useStateManager } from "../support/db";
import { assertInvariants } from "../support/invariants";
import {
  claim,
  createScenario,
  elapseLease,
  handlersOf,
  stepState,
  succeed,
  taskState,
} from "../support/scenario";

describe("dispatch and leases", () => {
  const t = useStateManager("leases");
  afterEach(async () => await assertInvariants(t));

  it("claims only served handlers, highest priority first, and starts the task on its first claim", async () => {
    const low = await createScenario(t.sm, [{ name: "s", handler: "prio" }]);
    const high = await t.sm.createTask({ ...low.template, context: {}, priority: 10 });
    const other = await createScenario(t.sm, [{ name: "s", handler: "other" }]);
    assert.deepEqual(await t.sm.claimSteps({ brokerId: "b1", handlers: ["nobody"], limit: 10 }), []);
    assert.deepEqual(await t.sm.claimSteps({ brokerId: "b1", handlers: ["prio"], limit: 0 }), []);
    const [first] = await t.sm.claimSteps({ brokerId: "b1", handlers: ["prio"], limit: 1 });
    assert.equal(first?.task_id, high.task.task_id, "priority 10 before priority 0");
    // the query formats the lease expiry itself: exactly what toISOString makes of the stored value
    const [lease] = await t.sql<{ lease_expires_at: Date }>(
      `select lease_expires_at from steps where id = $1`,
      [first.step_id],
    );
    assert.equal(first.lease_expires_at, lease?.lease_expires_at.toISOString());
    assert.equal(await taskState(t.sm, high.task), TaskStates.IN_PROGRESS);
    assert.equal(await taskState(t.sm, low), TaskStates.PENDING);
    const [second] = await t.sm.claimSteps({ brokerId: "b1", handlers: ["prio", "other"], limit: 1 });
    assert.equal(second?.task_id, low.task_id, "then the one ready longest");
    assert.equal(await stepState(t.sm, other, "s"), StepStates.READY);
    const history = await t.sql<{ from_state: string | null; to_state: string; event: string }>(
      `select from_state, to_state, event from task_transitions where task_id = $1 order by sort_key`,
      [low.task_id],
    );
    // the start's own transition is written with the task's next one (0016); until then the history
    // read shows it from the task row
    assert.deepEqual(history, [{ from_state: null, to_state: "pending", event: "created" }]);
    const shown = await t.sm.getTransitions(low.task_id);
    assert.deepEqual(
      shown.filter((tr) => tr.stepId === null).map((tr) => [tr.from, tr.to, tr.event]),
      [
        [null, "pending", "created"],
        ["pending", "in_progress", "started"],
      ],
    );
    await t.sm.completeAttempts([{ attemptId: second.attempt_id, status: "complete", output: 1 }]);
    const ended = await t.sql<{ to_state: string; event: string; sort_key: number }>(
      `select to_state, event, sort_key from task_transitions where task_id = $1 order by sort_key`,
      [low.task_id],
    );
    assert.deepEqual(
      ended.map((h) => [h.sort_key, h.to_state, h.event]),
      [
        [1, "pending", "created"],
        [2, "in_progress", "started"],
        [3, "complete", "completed"],
      ],
    );
    await assertInvariants(t);
  });

  it("extends the leases of attempts that hold them and reports those that do not", async () => {
    const task = await createScenario(t.sm, [{ name: "a", timeout_ms: 5000 }, { name: "b" }]);
    const [a, b] = await claim(t.sm, task, ["a", "b"]);
    assert.ok(a && b);
    await elapseLease(t, a.step_id);
    await succeed(t.sm, b);
    const lost = await t.sm.extendLeases([a.attempt_id, b.attempt_id, "junk"]);
    assert.deepEqual(lost, [b.attempt_id, "junk"], "a still holds its (late but unreaped) lease; b finished");
    const [row] = await t.sql<{ left_ms: number }>(
      `select extract(epoch from lease_expires_at - now()) * 1000 as left_ms from steps where id = $1`,
      [a.step_id],
    );
    assert.ok(row && row.left_ms > 0 && row.left_ms <= 5000, "extended by its timeout from now");
    assert.deepEqual(await t.sm.expireLeases({ brokerId: "b1" }), []);
  });

  it("releases attempts: uncounted when never delivered, counted when the pool died; never another attempt's lease", async () => {
    const task = await createScenario(t.sm, [{ name: "s", retry: { max_attempts: 2 } }]);
    const [first] = await claim(t.sm, task, ["s"]);
    assert.ok(first);
    const back = await t.sm.releaseAttempts([first.attempt_id], {
      countAttempt: false,
      reason: "send failed",
    });
    assert.deepEqual(
      back.attempts.map((a) => [a.attemptId, a.state]),
      [[first.attempt_id, StepStates.READY]],
    );
    const [second] = await claim(t.sm, task, ["s"]);
    assert.ok(second);
    assert.equal(second.attempt, 1, "the attempt number was given back");
    // releasing the old attempt again must not touch the step, now leased to `second`
    const none = await t.sm.releaseAttempts([first.attempt_id], { countAttempt: true, reason: "pool died" });
    assert.deepEqual(none.attempts, []);
    assert.equal(await stepState(t.sm, task, "s"), StepStates.IN_PROGRESS);
    const counted = await t.sm.releaseAttempts([second.attempt_id], {
      countAttempt: true,
      reason: "pool died",
    });
    assert.equal(counted.attempts[0]?.state, StepStates.READY);
    const [third] = await claim(t.sm, task, ["s"]);
    assert.ok(third);
    assert.equal(third.attempt, 2);
    const last = await t.sm.releaseAttempts([third.attempt_id], { countAttempt: true, reason: "pool died" });
    assert.equal(last.attempts[0]?.state, StepStates.ERROR, "no attempt left after a counted loss");
    assert.deepEqual(
      last.finishedTasks.map((f) => f.state),
      [TaskStates.ERROR],
    );
    const attempts = await t.sm.getAttempts(task.task_id);
    assert.deepEqual(
      attempts.map((a) => a.outcome),
      ["undelivered", "lost", "lost"],
    );
  });

  it("recovers the orphans of a previous broker life and expired leases of any broker, keeping its own new leases", async () => {
    const task = await createScenario(t.sm, [
      { name: "old" },
      { name: "other" },
      { name: "fresh" },
      { name: "alive" },
    ]);
    const [old] = await claim(t.sm, task, ["old"], "broker-a");
    const [other] = await claim(t.sm, task, ["other"], "broker-b");
    assert.ok(old && other);
    const [boundary] = await t.sql<{ now: Date }>(`select clock_timestamp() as now`);
    assert.ok(boundary);
    const [fresh] = await claim(t.sm, task, ["fresh"], "broker-a");
    const [alive] = await claim(t.sm, task, ["alive"], "broker-c");
    assert.ok(fresh && alive);
    await elapseLease(t, other.step_id);
    const { attempts } = await t.sm.recoverOrphans({ brokerId: "broker-a", olderThan: boundary.now });
    assert.deepEqual(attempts.map((a) => a.attemptId).sort(), [old.attempt_id, other.attempt_id].sort());
    assert.ok(attempts.every((a) => a.state === StepStates.READY));
    assert.equal(await stepState(t.sm, task, "fresh"), StepStates.IN_PROGRESS);
    assert.equal(await stepState(t.sm, task, "alive"), StepStates.IN_PROGRESS);
    const [again] = await claim(t.sm, task, ["old"], "broker-a");
    assert.equal(again?.attempt, 2, "the lost attempt counted");
    assert.deepEqual(handlersOf(task).length, 1);
  });
});
