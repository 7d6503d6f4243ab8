/** Small builders for state tests: one-off templates and single-step moves. */
import assert from "node:assert/strict";
import type { StateManager } from "../../broker/state/StateManager";
import type { ClaimedStep, CompletionResult, JsonValue, StepError, TaskView } from "../../broker/state/types";
import type { TestState } from "./db";

let counter = 0;

export interface StepSpec {
  name: string;
  handler?: string;
  depends_on?: string[];
  timeout_ms?: number;
  retry?: {
    max_attempts?: number;
    retryable?: boolean;
    backoff?: { initial_ms?: number; multiplier?: number; max_ms?: number; jitter?: number };
  };
}

/**
 * Registers a template with these steps and creates one task of it. Steps get
 * handler "h<n>", unique to the scenario (so tests sharing a schema never claim
 * each other's steps), and no backoff unless given.
 */
export async function createScenario(
  sm: StateManager,
  steps: StepSpec[],
  context: Record<string, JsonValue> = {},
): Promise<TaskView> {
  const name = `scenario_${++counter}`;
  const handler = `h${counter}`;
  await sm.registerTemplate({
    namespace: "test",
    name,
    version: "1",
    steps: steps.map((s) => ({
      handler,
      ...s,
      retry: { ...s.retry, backoff: { initial_ms: 0, jitter: 0, ...s.retry?.backoff } },
    })),
  });
  const { task } = await sm.createTask({ namespace: "test", name, context });
  return task;
}

/** The handlers of a scenario's steps. */
export function handlersOf(task: TaskView): string[] {
  return [...new Set((task.steps ?? []).map((s) => s.handler))];
}

/** Claims among the named steps, asserting that exactly those were claimable. */
export async function claim(
  sm: StateManager,
  task: TaskView,
  names: string[],
  brokerId = "b1",
): Promise<ClaimedStep[]> {
  const ids = names.map((n) => {
    const step = task.steps?.find((s) => s.name === n);
    assert.ok(step, `no step ${n}`);
    return step.step_id;
  });
  if (ids.length === 0) return [];
  const claimed = await sm.claimSteps({ brokerId, handlers: handlersOf(task), limit: 100, stepIds: ids });
  assert.deepEqual(claimed.map((c) => c.step_name).sort(), [...names].sort(), "claimed steps");
  return claimed;
}

export async function succeed(
  sm: StateManager,
  step: ClaimedStep,
  output: JsonValue = { from: step.step_name },
): Promise<CompletionResult> {
  return await sm.completeAttempts([{ attemptId: step.attempt_id, status: "complete", output }]);
}

export async function fail(
  sm: StateManager,
  step: ClaimedStep,
  error: Partial<StepError> = {},
): Promise<CompletionResult> {
  return await sm.completeAttempts([
    {
      attemptId: step.attempt_id,
      status: "error",
      error: { type: "Boom", message: `${step.step_name} broke`, retryable: true, ...error },
    },
  ]);
}

export async function stepState(sm: StateManager, task: TaskView, name: string): Promise<string | undefined> {
  const view = await sm.getTask(task.task_id, { includeSteps: true });
  return view?.steps?.find((s) => s.name === name)?.state;
}

export async function taskState(sm: StateManager, task: TaskView): Promise<string | undefined> {
  return (await sm.getTask(task.task_id))?.state;
}

/** The delay a retry waits, from the transaction that scheduled it (run_at minus that transition's time): exact, no clock reading. */
export async function scheduledDelayMs(t: TestState, stepId: string): Promise<number> {
  const [row] = await t.sql<{ delay: number }>(
    `select (extract(epoch from s.run_at - tr.created_at) * 1000)::float8 as delay
     from steps s join step_transitions tr on tr.step_id = s.id and tr.sort_key = s.history_seq where s.id = $1`,
    [stepId],
  );
  assert.ok(row);
  return Math.round(row.delay * 1000) / 1000;
}

/** Moves a step's backoff (run_at) into the past, as if the wait had elapsed. */
export async function elapseBackoff(t: TestState, stepId: string): Promise<void> {
  await t.sql(`update steps set run_at = now() - interval '1 millisecond' where id = $1`, [stepId]);
}

/** Moves a step's lease expiry into the past, as if its timeout had elapsed. */
export async function elapseLease(t: TestState, stepId: string): Promise<void> {
  await t.sql(`update steps set lease_expires_at = now() - interval '1 millisecond' where id = $1`, [stepId]);
}
