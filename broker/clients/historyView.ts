/**
 * A task's history in the protocol's words (REPLY to HISTORY): the records
 * `stepbroker history --json` prints, with the wire's snake_case names, so a
 * client in any language reads the same fields as the rest of the protocol.
 */
import type { AttemptView, TaskHistoryView, TransitionView } from "../../protocol";
import type { TaskHistory } from "../state/TaskHistory";

export function historyView(h: TaskHistory): TaskHistoryView {
  return {
    transitions: h.transitions.map((t): TransitionView => ({
      step_id: t.stepId,
      step_name: t.stepName,
      from: t.from,
      to: t.to,
      event: t.event,
      attempt_id: t.attemptId,
      metadata: t.metadata,
      at: t.at,
    })),
    attempts: h.attempts.map((a): AttemptView => ({
      attempt_id: a.attemptId,
      step_id: a.stepId,
      step_name: a.stepName,
      attempt: a.attempt,
      broker_id: a.brokerId,
      pool_id: a.poolId,
      started_at: a.startedAt,
      finished_at: a.finishedAt,
      duration_ms: a.durationMs,
      outcome: a.outcome,
      error: a.error,
      output_bytes: a.outputBytes,
      usage: a.usage,
    })),
  };
}
