/**
 * A broker without sockets: claims ready steps, runs a behaviour per handler in
 * memory and completes the results in batches, until nothing is claimable.
 * Bounded by `maxRounds`; never sleeps.
 */
import type { StateManager } from "../../broker/state/StateManager";
import type {
  AttemptResult,
  ClaimedStep,
  CompletionResult,
  JsonValue,
  StepError,
} from "../../broker/state/types";

export type StepReply = { output: JsonValue } | { error: StepError };
export type Behaviour = (step: ClaimedStep) => StepReply;

export interface DriveOptions {
  handlers: Record<string, Behaviour>;
  brokerId?: string;
  batch?: number;
  maxRounds?: number;
}

export interface DriveLog {
  claimed: ClaimedStep[];
  completions: CompletionResult[];
  rounds: number;
}

export function toResult(step: ClaimedStep, reply: StepReply): AttemptResult {
  return "output" in reply
    ? {
        attemptId: step.attempt_id,
        status: "complete",
        output: reply.output,
        durationMs: 1,
        poolId: "test-pool",
      }
    : { attemptId: step.attempt_id, status: "error", error: reply.error, durationMs: 1, poolId: "test-pool" };
}

export async function drive(sm: StateManager, options: DriveOptions): Promise<DriveLog> {
  const log: DriveLog = { claimed: [], completions: [], rounds: 0 };
  const handlers = Object.keys(options.handlers);
  const maxRounds = options.maxRounds ?? 100;
  for (; log.rounds < maxRounds; log.rounds++) {
    const claimed = await sm.claimSteps({
      brokerId: options.brokerId ?? "test-broker",
      handlers,
      limit: options.batch ?? 100,
    });
    if (claimed.length === 0) return log;
    log.claimed.push(...claimed);
    const results = claimed.map((step) => {
      const behaviour = options.handlers[step.handler];
      if (behaviour === undefined) throw new Error(`no behaviour for handler ${step.handler}`);
      return toResult(step, behaviour(step));
    });
    log.completions.push(await sm.completeAttempts(results));
  }
  throw new Error(`drive did not settle within ${maxRounds} rounds`);
}

/** A behaviour whose output records the step and exactly what it was given. */
export const echo: Behaviour = (step) => ({
  output: { step: step.step_name, attempt: step.attempt, inputs: step.inputs, config: step.config },
});

export function stepError(
  type: string,
  message: string,
  retryable: boolean,
  extra: Partial<StepError> = {},
): StepReply {
  return { error: { type, message, retryable, ...extra } };
}
