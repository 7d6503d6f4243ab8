/**
 * Judging a batch of results from what complete_results() returned: a pure
 * function, so every case (stored, a duplicate within the batch or from
 * before, stale, unknown) is plain to read and to test without a database.
 */
import { AckOutcomes, type AckOutcome, StepStates } from "../../protocol/constants";
import { type CompletionRow, claimedStep, ended, iso, readied } from "./rows";
import { AttemptEndings } from "./transitions";
import type { AttemptOutcome, ClaimedStep, CompletionResult, FinishedTask, ReadiedStep } from "./types";

/**
 * `outcomes` holds one entry per result of the batch (all `unknown` so far) and
 * is completed in place; `valid` are the indexes of the results that reached SQL,
 * and `attemptIds` their attempt ids in that order, as sent.
 */
export function judgeCompletion(
  rows: readonly CompletionRow[],
  outcomes: AttemptOutcome[],
  valid: readonly number[],
  attemptIds: readonly string[],
): CompletionResult {
  const readiedSteps: ReadiedStep[] = [];
  const claimed: ClaimedStep[] = [];
  const finishedTasks: FinishedTask[] = [];
  const stored = new Map<string, CompletionRow>();
  const known = new Map<string, CompletionRow>();
  for (const row of rows) {
    if (row.kind === "readied") readiedSteps.push(readied(row));
    else if (row.kind === "claimed" && row.claim !== null)
      claimed.push(claimedStep(row.claim, iso(new Date(row.claim.lease_expires_at))));
    else if (row.kind === "ended") finishedTasks.push(ended(row));
    else if (row.attempt_id !== null) (row.kind === "stored" ? stored : known).set(row.attempt_id, row);
  }
  // Judge each result; a later copy of an attempt in this batch is a duplicate of the first.
  const judged = new Map<string, AckOutcome>();
  for (const [k, i] of valid.entries()) {
    const outcome = outcomes[i] as AttemptOutcome;
    const id = attemptIds[k] ?? "";
    const mine = stored.get(id);
    const record = mine ?? known.get(id);
    if (record?.step_id) outcome.stepId = record.step_id;
    if (record?.task_id) outcome.taskId = record.task_id;
    const earlier = judged.get(id);
    if (earlier !== undefined) {
      outcome.outcome = earlier === AckOutcomes.STORED ? AckOutcomes.DUPLICATE : earlier;
      continue;
    }
    if (mine !== undefined) {
      outcome.outcome = AckOutcomes.STORED;
      if (mine.state !== null) outcome.state = mine.state;
      if (mine.state === StepStates.READY) readiedSteps.push(readied(mine));
    } else if (record === undefined || record.step_id === null) {
      outcome.outcome = AckOutcomes.UNKNOWN;
    } else if (
      record.prior_outcome === AttemptEndings.COMPLETE ||
      record.prior_outcome === AttemptEndings.ERROR
    ) {
      outcome.outcome = AckOutcomes.DUPLICATE;
    } else {
      outcome.outcome = AckOutcomes.STALE;
    }
    judged.set(id, outcome.outcome);
  }
  return { outcomes, readied: readiedSteps, claimed, finishedTasks };
}
