/**
 * What an operator may do to a task: cancel it, retry its failed steps, or
 * resolve a step by hand (with an output its children receive).
 */
import type pg from "pg";
import { CancelReasons, StepStates, type TaskState, TaskStates } from "../../protocol/constants";
import { StateError } from "./errors";
import { failedAncestors } from "./explain";
import type { EventNotifier } from "./EventNotifier";
import type { StateSql } from "./StateSql";
import type { WorkNotifier } from "./WorkNotifier";
import { type StepChangeRow, type StepRow, isUuid, readied } from "./rows";
import type { BrokerEvent, EventAttempt, FinishedTask, JsonValue, ReadiedStep } from "./types";

export class OperatorActions {
  constructor(
    private readonly sql: StateSql,
    private readonly notifier: WorkNotifier,
    private readonly events: EventNotifier,
  ) {}

  private async lockTask(
    client: pg.PoolClient,
    ids: { taskId?: string; stepId?: string },
  ): Promise<{ id: string; state: TaskState } | undefined> {
    const taskId = ids.taskId !== undefined && isUuid(ids.taskId) ? ids.taskId : null;
    const stepId = ids.stepId !== undefined && isUuid(ids.stepId) ? ids.stepId : null;
    if (taskId === null && stepId === null) return undefined;
    const [row] = await this.sql.runIn<{ id: string; state: TaskState }>(client, "lock_task", [
      taskId,
      stepId,
    ]);
    return row;
  }

  /**
   * Cancels a task: every unfinished step becomes cancelled, and so does the
   * task. Returns the attempts that were in flight, so the broker can tell
   * their pools. A task already finished is left as it is.
   *
   * In the same transaction it announces, to every broker on the database, a
   * cancel event (reason task_cancelled) naming each in-flight attempt and the
   * broker that leased it, and the task's finished event; this process's event
   * listeners get both once it has committed (so a broker may see its own
   * attempts both here and in the event: CANCEL those it still holds, once).
   */
  async cancelTask(taskId: string): Promise<{ cancelledAttempts: string[]; state: TaskState }> {
    const result = await this.sql.transaction("cancelTask", async (client) => {
      const task = await this.lockTask(client, { taskId });
      if (task === undefined) throw new StateError("unknown_task", `no task ${taskId}`);
      if (task.state !== TaskStates.PENDING && task.state !== TaskStates.IN_PROGRESS) {
        return { cancelledAttempts: [], state: task.state, events: [] };
      }
      const rows = await this.sql.runIn<{ attempt_id: string; broker_id: string | null }>(
        client,
        "cancel_task",
        [task.id],
      );
      const attempts: EventAttempt[] = rows.map((r) => ({
        attemptId: r.attempt_id,
        taskId: task.id,
        brokerId: r.broker_id ?? "",
      }));
      const finished = [{ taskId: task.id, state: TaskStates.CANCELLED }];
      await this.events.send(client, [
        ...this.events.cancelPayloads(CancelReasons.TASK_CANCELLED, attempts),
        ...this.events.finishedPayloads(finished),
      ]);
      this.sql.logger.info(
        { task_id: task.id, inFlight: rows.length, brokers: [...new Set(attempts.map((a) => a.brokerId))] },
        "cancelled task",
      );
      const events: BrokerEvent[] = [
        ...(attempts.length > 0
          ? [{ kind: "cancel" as const, reason: CancelReasons.TASK_CANCELLED, attempts }]
          : []),
        { kind: "finished", taskId: task.id, state: TaskStates.CANCELLED },
      ];
      return { cancelledAttempts: rows.map((r) => r.attempt_id), state: TaskStates.CANCELLED, events };
    });
    this.events.wakeLocal(result.events);
    return { cancelledAttempts: result.cancelledAttempts, state: result.state };
  }

  /**
   * An operator's retry. { stepId }: that error step runs again, attempts reset.
   * { taskId }: all of its error and cancelled steps do (those whose parents are
   * not done wait as pending). The task runs again.
   */
  async retry(
    target: { taskId: string } | { stepId: string },
  ): Promise<{ retried: string[]; readied: ReadiedStep[] }> {
    const result = await this.sql.transaction("retry", async (client) => {
      const task = await this.lockTask(client, target);
      const what = "taskId" in target ? `task ${target.taskId}` : `step ${target.stepId}`;
      if (task === undefined)
        throw new StateError("taskId" in target ? "unknown_task" : "invalid_request", `no ${what}`);
      if (task.state === TaskStates.COMPLETE)
        throw new StateError("invalid_request", `${what}: the task is complete, nothing to retry`);
      if ("stepId" in target && task.state === TaskStates.CANCELLED) {
        throw new StateError("invalid_request", `${what}: its task is cancelled; retry the task instead`);
      }
      const rows = await this.sql.runIn<StepChangeRow>(client, "retry_steps", [
        task.id,
        "stepId" in target ? target.stepId : null,
        this.notifier.workChannel,
        this.notifier.payload("retried"),
      ]);
      if (rows.length === 0) {
        throw new StateError(
          "invalid_request",
          "stepId" in target ? `${what} is not in error` : `${what} has no error or cancelled steps`,
        );
      }
      const finishedTasks = await this.sql.finalize(client, [task.id]);
      return {
        retried: rows.map((r) => r.step_id),
        readied: rows.filter((r) => r.state === StepStates.READY).map(readied),
        finishedTasks,
      };
    });
    this.events.wakeFinished(result.finishedTasks);
    this.sql.logger.info({ target, retried: result.retried.length }, "retry");
    if (result.readied.length > 0) this.notifier.wakeLocal({ reason: "retried" });
    return { retried: result.retried, readied: result.readied };
  }

  /**
   * An operator marks a step resolved_manually: an error step, or a pending one
   * blocked by a failed ancestor. With `output` (JSON null included) it is stored
   * and given to the children as this step's input; without, they get null. It
   * counts as a finished parent, so its children may proceed and the task may complete.
   */
  async resolveStep(
    stepId: string,
    output?: JsonValue,
  ): Promise<{ readied: ReadiedStep[]; finishedTasks: FinishedTask[] }> {
    const result = await this.sql.transaction("resolveStep", async (client) => {
      const task = await this.lockTask(client, { stepId });
      if (task === undefined) throw new StateError("invalid_request", `no step ${stepId}`);
      if (task.state !== TaskStates.IN_PROGRESS && task.state !== TaskStates.ERROR) {
        throw new StateError(
          "invalid_request",
          `step ${stepId}: its task is ${task.state}; only a running or failed task's steps can be resolved`,
        );
      }
      const steps = await this.sql.runIn<StepRow>(client, "get_steps", [[task.id]]);
      const step = steps.find((s) => s.id === stepId.toLowerCase());
      if (step === undefined) throw new StateError("invalid_request", `no step ${stepId}`);
      if (step.state === StepStates.PENDING) {
        const byName = new Map(steps.map((s) => [s.name, s]));
        if (failedAncestors(step.name, byName).length === 0) {
          throw new StateError(
            "invalid_request",
            `step "${step.name}" is pending but not blocked by a failed step; it will run when its parents finish`,
          );
        }
      } else if (step.state !== StepStates.ERROR) {
        throw new StateError(
          "invalid_request",
          `step "${step.name}" is ${step.state}; only an error step or a blocked pending step can be resolved`,
        );
      }
      const rows = await this.sql.runIn<StepChangeRow>(client, "resolve_step", [
        step.id,
        output === undefined ? null : JSON.stringify(output),
        this.notifier.workChannel,
        this.notifier.payload("resolved"),
      ]);
      const finishedTasks = await this.sql.finalize(client, [task.id]);
      this.sql.logger.info({ stepId, name: step.name, taskId: task.id }, "step resolved manually");
      return { readied: rows.filter((r) => r.kind === "readied").map(readied), finishedTasks };
    });
    this.events.wakeFinished(result.finishedTasks);
    if (result.readied.length > 0) this.notifier.wakeLocal({ reason: "resolved" });
    return result;
  }
}
