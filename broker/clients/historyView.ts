/**
 * A task's history in the protocol's words (REPLY to HISTORY): the records
 * `stepbroker history --json` prints, with the wire's snake_case names, so a
 * client in any language reads the same fields as the rest of the protocol.
 */
import type { AttemptView, TaskHistoryView, TaskView, TransitionView } from "../../protocol";
import type { TaskHistory } from "../state/TaskHistory";
import type { AttemptRecord, JsonValue } from "../state/types";

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

/** The other way: a HISTORY REPLY as the records `stepbroker history` formats (the CLI with --endpoint). */
export function historyFromView(task: TaskView, h: TaskHistoryView): TaskHistory {
  // The wire's types are the schema's, looser than the state's (any JSON where the state says JsonValue);
  // what arrives is what historyView and the task reads built from the state's types.
  return {
    task: task as TaskHistory["task"],
    transitions: h.transitions.map((t) => ({
      stepId: t.step_id,
      stepName: t.step_name,
      from: t.from,
      to: t.to as TaskHistory["transitions"][number]["to"],
      event: t.event,
      attemptId: t.attempt_id,
      metadata: (t.metadata ?? null) as JsonValue | null,
      at: t.at,
    })),
    attempts: h.attempts.map((a): AttemptRecord => ({
      attemptId: a.attempt_id,
      stepId: a.step_id,
      taskId: task.task_id,
      stepName: a.step_name,
      attempt: a.attempt,
      brokerId: a.broker_id,
      poolId: a.pool_id,
      startedAt: a.started_at,
      finishedAt: a.finished_at,
      durationMs: a.duration_ms,
      outcome: a.outcome,
      error: a.error as AttemptRecord["error"],
      outputBytes: a.output_bytes,
      usage: a.usage,
    })),
  };
}
