/**
 * judgeCompletion, the pure half of storing a batch of results: from the rows
 * complete_results() returned, every result's ACK outcome. No database.
 */
import assert from "node:assert/strict";
import { judgeCompletion } from "../../broker/state/judgeCompletion";
import type { CompletionRow } from "../../broker/state/rows";
import type { AttemptOutcome } from "../../broker/state/types";

const A = "00000000-0000-7000-8000-00000000000a";
const B = "00000000-0000-7000-8000-00000000000b";
const C = "00000000-0000-7000-8000-00000000000c";
const D = "00000000-0000-7000-8000-00000000000d";
const E = "00000000-0000-7000-8000-00000000000e";

function row(kind: CompletionRow["kind"], fields: Partial<CompletionRow>): CompletionRow {
  return {
    kind,
    attempt_id: null,
    prior_outcome: null,
    step_id: null,
    task_id: null,
    state: null,
    handler: null,
    run_at: null,
    claim: null,
    error: null,
    ...fields,
  };
}

function unknowns(ids: string[]): AttemptOutcome[] {
  return ids.map((attemptId) => ({ attemptId, outcome: "unknown" }));
}

describe("judgeCompletion", () => {
  it("judges stored, duplicate (in the batch and from before), stale and unknown results", () => {
    const ids = [A, A, B, C, D, "not-a-uuid"];
    const rows = [
      row("stored", { attempt_id: A, step_id: "sa", task_id: "ta", state: "complete" }),
      row("known", { attempt_id: B, step_id: "sb", task_id: "tb", prior_outcome: "complete" }),
      row("known", { attempt_id: C, step_id: "sc", task_id: "tc", prior_outcome: "timeout" }),
      row("known", { attempt_id: D }),
    ];
    // the last result never reached SQL (index 5 is not in valid)
    const out = judgeCompletion(rows, unknowns(ids), [0, 1, 2, 3, 4], [A, A, B, C, D]);
    assert.deepEqual(
      out.outcomes.map((o) => o.outcome),
      ["stored", "duplicate", "duplicate", "stale", "unknown", "unknown"],
    );
    assert.equal(out.outcomes[0]?.state, "complete");
    assert.equal(out.outcomes[2]?.stepId, "sb");
    assert.equal(out.outcomes[3]?.taskId, "tc");
  });

  it("reports a stored retry as ready, and collects readied, claimed and ended rows", () => {
    const runAt = "2026-12-01T10:00:00.000Z";
    const rows = [
      row("stored", {
        attempt_id: A,
        step_id: "sa",
        task_id: "t",
        handler: "h",
        state: "ready",
        run_at: runAt,
      }),
      row("readied", { step_id: "child", task_id: "t", handler: "h", run_at: runAt }),
      row("ended", {
        task_id: "t2",
        state: "error",
        error: { message: "step x failed", failed_steps: ["x"] },
      }),
      row("claimed", {
        claim: {
          task_id: "t",
          step_id: "c2",
          attempt_id: E,
          step_name: "c2",
          handler: "h",
          attempt: 1,
          max_attempts: 3,
          timeout_ms: 1000,
          template: { namespace: "n", name: "m", version: "1" },
          context: {},
          config: {},
          inputs: {},
          // a claimed_step as jsonb writes it: microseconds and an offset
          lease_expires_at: "2026-12-01T11:00:01.123456+01:00",
          children: 0,
        },
      }),
    ];
    const out = judgeCompletion(rows, unknowns([A]), [0], [A]);
    assert.deepEqual(out.readied.map((r) => r.stepId).sort(), ["child", "sa"]);
    assert.deepEqual(
      out.claimed.map((c) => c.attempt_id),
      [E],
    );
    assert.deepEqual(
      out.finishedTasks.map((t) => [t.taskId, t.state]),
      [["t2", "error"]],
    );
    assert.equal(out.readied[0]?.runAt, runAt);
    assert.equal(out.claimed[0]?.lease_expires_at, "2026-12-01T10:00:01.123Z", "as toISOString writes it");
  });
});
