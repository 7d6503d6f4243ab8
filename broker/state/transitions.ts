/**
 * The legal state moves and the events that cause them. The same moves are
 * enforced in SQL by the triggers of sql/migrations/0001_init.sql; a test
 * checks the two lists agree.
 *
 * Step:
 *  pending            -> ready (last parent finished), cancelled, resolved_manually (operator, when blocked),
 *                        in_progress (last parent finished and claimed in the same update, with that
 *                        parent's result: recorded as the two transitions pending -> ready -> in_progress)
 *  ready              -> in_progress (claimed), cancelled
 *  in_progress        -> complete (result stored with its output), ready (retry, release, expiry),
 *                        error (permanent error, attempts exhausted), cancelled
 *  error              -> ready (operator retry), resolved_manually (operator)
 *  cancelled          -> ready, pending (operator retry of the task)
 *  complete, resolved_manually: final
 *
 * Task:
 *  pending            -> in_progress (first step claimed), cancelled, complete/error (finalized)
 *  in_progress        -> complete, error (no step can move any more), cancelled
 *  error, cancelled   -> in_progress (operator retry or resolution)
 */
import { type StepState, StepStates, type TaskState, TaskStates } from "../../protocol/constants";

const S = StepStates;
const T = TaskStates;

export const STEP_MOVES: Readonly<Record<StepState, readonly StepState[]>> = {
  [S.PENDING]: [S.READY, S.IN_PROGRESS, S.CANCELLED, S.RESOLVED_MANUALLY],
  [S.READY]: [S.IN_PROGRESS, S.CANCELLED],
  [S.IN_PROGRESS]: [S.COMPLETE, S.READY, S.ERROR, S.CANCELLED],
  [S.COMPLETE]: [],
  [S.ERROR]: [S.READY, S.RESOLVED_MANUALLY],
  [S.CANCELLED]: [S.READY, S.PENDING],
  [S.RESOLVED_MANUALLY]: [],
};

export const TASK_MOVES: Readonly<Record<TaskState, readonly TaskState[]>> = {
  [T.PENDING]: [T.IN_PROGRESS, T.CANCELLED, T.COMPLETE, T.ERROR],
  [T.IN_PROGRESS]: [T.COMPLETE, T.ERROR, T.CANCELLED],
  [T.COMPLETE]: [],
  [T.ERROR]: [T.IN_PROGRESS],
  [T.CANCELLED]: [T.IN_PROGRESS],
};

/** A step is finished for its children when one of these. */
export const FINISHED_PARENT_STATES: readonly StepState[] = [S.COMPLETE, S.RESOLVED_MANUALLY];
/** Steps in these states can never run unless an operator acts. */
export const FAILED_STEP_STATES: readonly StepState[] = [S.ERROR, S.CANCELLED];

/** The `event` column of transition rows. */
export const TransitionEvents = {
  CREATED: "created",
  CLAIMED: "claimed",
  COMPLETED: "completed",
  FAILED: "failed",
  RETRY_SCHEDULED: "retry_scheduled",
  PARENTS_FINISHED: "parents_finished",
  TIMED_OUT: "timed_out",
  RELEASED: "released",
  RECOVERED: "recovered",
  CANCELLED: "cancelled",
  RETRIED: "retried",
  RESOLVED: "resolved",
  STARTED: "started",
  RESUMED: "resumed",
} as const;
export type TransitionEvent = (typeof TransitionEvents)[keyof typeof TransitionEvents];

/** Outcomes an attempt row can end with (step_attempts.outcome). */
export const AttemptEndings = {
  COMPLETE: "complete",
  ERROR: "error",
  TIMEOUT: "timeout",
  LOST: "lost",
  UNDELIVERED: "undelivered",
  CANCELLED: "cancelled",
} as const;
export type AttemptEnding = (typeof AttemptEndings)[keyof typeof AttemptEndings];
