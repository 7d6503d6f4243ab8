/**
 * Reads: a task as the protocol's task_view, a step's or task's attempts, and
 * the explain table of why each step is or is not ready.
 */
import { StateError } from "./errors";
import { type ExplainInput, explainSteps } from "./explain";
import type { StateSql } from "./StateSql";
import { type AttemptRow, type StepRow, type TaskRow, isUuid, iso } from "./rows";
import type { AttemptRecord, ExplainRow, StepView, TaskView, Usage } from "./types";

export class TaskReads {
  constructor(private readonly sql: StateSql) {}

  /** The task as protocol task_view (with its steps when asked), or null. */
  async getTask(taskId: string, options: { includeSteps?: boolean } = {}): Promise<TaskView | null> {
    if (!isUuid(taskId)) return null;
    const [row] = await this.sql.run<TaskRow>("get_tasks", [[taskId]]);
    if (row === undefined) return null;
    const view = taskView(row);
    if (options.includeSteps)
      view.steps = (await this.sql.run<StepRow>("get_steps", [[taskId]])).map(stepView);
    return view;
  }

  /** Many tasks as task_views with their steps, in two round trips whatever their number; absent ids are left out. */
  async getTasks(taskIds: readonly string[]): Promise<Map<string, TaskView>> {
    const ids = [...new Set(taskIds.filter(isUuid))];
    const views = new Map<string, TaskView>();
    if (ids.length === 0) return views;
    for (const row of await this.sql.run<TaskRow>("get_tasks", [ids])) {
      views.set(row.id, { ...taskView(row), steps: [] });
    }
    for (const s of await this.sql.run<StepRow>("get_steps", [ids])) {
      views.get(s.task_id)?.steps?.push(stepView(s));
    }
    return views;
  }

  /** Every attempt of a step, or of all steps of a task, oldest first. */
  async getAttempts(stepOrTaskId: string): Promise<AttemptRecord[]> {
    if (!isUuid(stepOrTaskId)) return [];
    const rows = await this.sql.run<AttemptRow>("get_attempts", [stepOrTaskId]);
    return rows.map((r) => {
      const usage: Usage = {};
      if (r.cost !== null) usage.cost = r.cost;
      if (r.tokens !== null) usage.tokens = r.tokens;
      if (r.artifacts !== null) usage.artifacts = r.artifacts;
      return {
        attemptId: r.attempt_id,
        stepId: r.step_id,
        taskId: r.task_id,
        stepName: r.step_name,
        attempt: r.attempt,
        brokerId: r.broker_id,
        poolId: r.pool_id,
        startedAt: iso(r.started_at),
        finishedAt: r.finished_at === null ? null : iso(r.finished_at),
        durationMs: r.duration_ms,
        outcome: r.outcome,
        error: r.error,
        outputBytes: r.output_bytes,
        usage,
      };
    });
  }

  /**
   * Per step, every readiness condition and the first that blocks it. With
   * servedHandlers (the handlers of connected pools), also whether a pool serves it.
   */
  async explain(
    taskId: string,
    options: { servedHandlers?: ReadonlySet<string> } = {},
  ): Promise<ExplainRow[]> {
    const steps = isUuid(taskId) ? await this.sql.run<StepRow>("get_steps", [[taskId]]) : [];
    if (steps.length === 0) throw new StateError("unknown_task", `no task ${taskId}`);
    const inputs: ExplainInput[] = steps.map((s) => ({
      id: s.id,
      name: s.name,
      handler: s.handler,
      state: s.state,
      attempts: s.attempts,
      maxAttempts: s.max_attempts,
      retryable: s.retryable,
      error: s.error,
      runAt: s.run_at,
      leaseAttemptId: s.lease_attempt_id,
      leaseBrokerId: s.lease_broker_id,
      leaseExpiresAt: s.lease_expires_at,
      parents: s.parents,
      now: s.db_now,
    }));
    return explainSteps(inputs, options.servedHandlers);
  }
}

function taskView(row: TaskRow): TaskView {
  return {
    task_id: row.id,
    template: { namespace: row.namespace, name: row.name, version: row.version },
    state: row.state,
    priority: row.priority,
    context: row.context,
    idempotency_key: row.idempotency_key,
    created_at: iso(row.created_at),
    finished_at: row.finished_at === null ? null : iso(row.finished_at),
    error: row.error,
  };
}

function stepView(s: StepRow): StepView {
  const step: StepView = {
    step_id: s.id,
    name: s.name,
    handler: s.handler,
    state: s.state,
    depends_on: s.parents.map((p) => p.name),
    attempts: s.attempts,
    max_attempts: s.max_attempts,
    error: s.error,
  };
  if (s.has_output) step.output = s.output;
  return step;
}
