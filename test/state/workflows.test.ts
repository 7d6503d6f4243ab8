import assert from "node:assert/strict";
import path from "node:path";
import { TaskStates, StepStates } from "../../protocol/constants";
import { loadTemplateFile } from "../../broker/state/templates";
import type { ClaimedStep, TaskView } from "../../broker/state/types";
import { useStateManager } from "../support/db";
import { drive, echo } from "../support/drive";
import { assertInvariants } from "../support/invariants";

const TEMPLATE_DIR = path.join(import.meta.dirname, "..", "..", "examples", "templates");

/** Every claimed step was given exactly the stored outputs of its parents, keyed by parent name. */
function assertInputsAreParentOutputs(task: TaskView, claimed: ClaimedStep[]): void {
  const steps = new Map((task.steps ?? []).map((s) => [s.name, s]));
  for (const c of claimed) {
    const step = steps.get(c.step_name);
    assert.ok(step, `claimed unknown step ${c.step_name}`);
    const expected = Object.fromEntries(step.depends_on.map((p) => [p, steps.get(p)?.output]));
    assert.deepEqual(c.inputs, expected, `inputs of ${c.step_name}`);
  }
}

describe("workflow shapes run to complete", () => {
  const t = useStateManager("workflows");

  const shapes: { file: string; steps: number; rounds: number }[] = [
    { file: "linear.yaml", steps: 6, rounds: 6 },
    { file: "diamond.yaml", steps: 4, rounds: 3 },
    { file: "parallel_merge.yaml", steps: 7, rounds: 3 },
    { file: "tree.yaml", steps: 8, rounds: 4 },
    { file: "mixed.yaml", steps: 8, rounds: 5 },
  ];

  for (const shape of shapes) {
    it(`runs ${shape.file} to complete, each output stored and passed to its dependents`, async () => {
      const def = await loadTemplateFile(path.join(TEMPLATE_DIR, shape.file));
      await t.sm.registerTemplate(def);
      const { task, created } = await t.sm.createTask({
        namespace: def.namespace,
        name: def.name,
        context: { shape: shape.file },
      });
      assert.equal(created, true);
      assert.equal(task.state, TaskStates.PENDING);
      assert.equal(task.steps?.length, shape.steps);
      // roots are ready at once, everything else waits
      for (const s of task.steps ?? []) {
        assert.equal(s.state, s.depends_on.length === 0 ? StepStates.READY : StepStates.PENDING, s.name);
      }

      const log = await drive(t.sm, { handlers: { "examples.work": echo, "examples.notify": echo } });
      // one round per level of the graph: children are ready right after their last parent's commit
      assert.equal(log.rounds, shape.rounds);
      assert.equal(log.claimed.length, shape.steps, "each step ran exactly once");
      for (const c of log.claimed) assert.deepEqual(c.context, { shape: shape.file });

      const done = await t.sm.getTask(task.task_id, { includeSteps: true });
      assert.ok(done);
      assert.equal(done.state, TaskStates.COMPLETE);
      assert.equal(done.error, null);
      assert.ok(done.finished_at);
      for (const s of done.steps ?? []) {
        assert.equal(s.state, StepStates.COMPLETE, s.name);
        assert.equal(s.attempts, 1);
        const claimed = log.claimed.find((c) => c.step_name === s.name);
        assert.ok(claimed);
        const reply = echo(claimed);
        assert.ok("output" in reply);
        assert.deepEqual(s.output, reply.output, `stored output of ${s.name}`);
      }
      assertInputsAreParentOutputs(done, log.claimed);
      const finished = log.completions.flatMap((c) => c.finishedTasks);
      assert.deepEqual(finished, [{ taskId: task.task_id, state: TaskStates.COMPLETE, error: null }]);
      await assertInvariants(t);
    });
  }

  it("passes config, context and template to the handler, and null inputs for parents without output", async () => {
    await t.sm.registerTemplate({
      namespace: "wf",
      name: "nulls",
      version: "1",
      steps: [
        { name: "a", handler: "h", config: { retries: "none" } },
        { name: "b", handler: "h" },
        { name: "c", handler: "h", depends_on: ["a", "b"] },
      ],
    });
    const { task } = await t.sm.createTask({ namespace: "wf", name: "nulls", context: { user: 7 } });
    const first = await t.sm.claimSteps({ brokerId: "b1", handlers: ["h"], limit: 10 });
    assert.equal(first.length, 2);
    const a = first.find((s) => s.step_name === "a");
    assert.ok(a);
    assert.deepEqual(a.config, { retries: "none" });
    assert.deepEqual(a.template, { namespace: "wf", name: "nulls", version: "1" });
    assert.equal(a.attempt, 1);
    assert.equal(a.max_attempts, 3);
    assert.equal(a.timeout_ms, 60000);
    // a stores JSON null, b stores a string: both are outputs
    const res = await t.sm.completeAttempts(
      first.map((s) => ({
        attemptId: s.attempt_id,
        status: "complete" as const,
        output: s.step_name === "a" ? null : "text",
      })),
    );
    assert.deepEqual(
      res.outcomes.map((o) => o.outcome),
      ["stored", "stored"],
    );
    assert.equal(res.readied.length, 1);
    const [c] = await t.sm.claimSteps({ brokerId: "b1", handlers: ["h"], limit: 10 });
    assert.ok(c);
    assert.deepEqual(c.inputs, { a: null, b: "text" });
    assert.deepEqual(c.context, { user: 7 });
    await t.sm.completeAttempts([{ attemptId: c.attempt_id, status: "complete", output: { ok: true } }]);
    const view = await t.sm.getTask(task.task_id, { includeSteps: true });
    const stepA = view?.steps?.find((s) => s.name === "a");
    assert.ok(stepA && "output" in stepA, "a JSON null output is present in the view");
    assert.equal(stepA.output, null);
    assert.equal(view?.state, TaskStates.COMPLETE);
  });
});
