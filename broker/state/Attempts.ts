/**
 * Attempts while they run: claiming ready steps under a lease, storing a
 * batch of results (group commit), extending leases on progress, and adopting
 * the attempts a reconnecting pool still holds.
 */
import { AckOutcomes } from "../../protocol/constants";
import { StateError } from "./errors";
import type { StateSql } from "./StateSql";
import { judgeCompletion } from "./judgeCompletion";
import { type ClaimTuple, type CompletionTuple, claimedTuple, completionRow, isUuid } from "./rows";
import type {
  AdoptedAttempt,
  AttemptOutcome,
  AttemptResult,
  ChildClaim,
  ClaimRequest,
  ClaimedStep,
  CompletionResult,
  PoolSessionOutcome,
} from "./types";

/** The statuses' JSON, not stringified again for every result. */
const STATUS_JSON: Readonly<Record<string, string>> = { complete: '"complete"', error: '"error"' };

export class Attempts {
  constructor(private readonly sql: StateSql) {}

  /**
   * Claims ready steps for the given handlers: each gets a fresh attempt id and
   * a lease of its timeout, in one statement. Highest priority first, then the
   * longest ready.
   */
  async claimSteps(request: ClaimRequest): Promise<ClaimedStep[]> {
    const limit = Math.min(Math.floor(request.limit), 100_000);
    if (limit <= 0 || request.handlers.length === 0) return [];
    const stepIds = request.stepIds === undefined ? null : request.stepIds.filter(isUuid);
    if (stepIds !== null && stepIds.length === 0) return [];
    const rows = await this.sql.runTuples<ClaimTuple>("claim_steps", [
      request.brokerId,
      request.handlers,
      limit,
      stepIds,
      request.poolId ?? null,
      request.avoidStepIds?.filter(isUuid) ?? null,
    ]);
    return rows.map(claimedTuple);
  }

  /**
   * Stores a batch of results in ONE transaction (group commit). Each result's
   * outcome: stored (its attempt held the lease: the step is now complete with
   * this output, or failed, or scheduled for a retry), duplicate (this attempt's
   * result was stored before), stale (the attempt lost its lease), unknown.
   * With `claim`, the children the batch readies are claimed in the same
   * transaction, up to its limit (see ChildClaim).
   */
  async completeAttempts(results: AttemptResult[], claim?: ChildClaim): Promise<CompletionResult> {
    const outcomes: AttemptOutcome[] = results.map((r) => ({
      attemptId: r.attemptId,
      outcome: AckOutcomes.UNKNOWN,
    }));
    // Only well-formed attempt ids reach SQL (a bad uuid would fail the whole batch's cast).
    const valid: number[] = [];
    results.forEach((r, i) => {
      if (!isUuid(r.attemptId)) return;
      if (r.status === "complete" && r.output === undefined) {
        throw new StateError(
          "invalid_request",
          `result for attempt ${r.attemptId} is complete but carries no output (send null for none)`,
        );
      }
      if (r.status === "error" && (r.error === undefined || r.error === null)) {
        throw new StateError(
          "invalid_request",
          `result for attempt ${r.attemptId} is an error but carries no error object`,
        );
      }
      valid.push(i);
    });
    if (valid.length === 0) return { outcomes, readied: [], claimed: [], finishedTasks: [] };

    // One JSON text for the whole batch (the contract of sql/queries/complete_attempts.sql), built
    // by concatenation: each output is stringified once, which its byte count needs anyway, and
    // nothing is escaped a second time, as eight array literals of JSON texts made the driver do.
    const attemptIds: string[] = [];
    let lastPoolId: string | undefined;
    let lastPoolJson = "";
    let json = "[";
    for (const i of valid) {
      const r = results[i] as AttemptResult;
      const attemptId = r.attemptId.toLowerCase();
      attemptIds.push(attemptId);
      // a well-formed uuid (checked above) needs no escaping
      json += `${json.length > 1 ? "," : ""}{"attempt_id":"${attemptId}","status":${STATUS_JSON[r.status] ?? JSON.stringify(r.status)}`;
      if (r.status === "complete") {
        // null (no output) is the common case, and its text and byte count are known
        const output = r.output === null ? "null" : (JSON.stringify(r.output) ?? "null");
        json += `,"output":${output},"output_bytes":${output === "null" ? 4 : Buffer.byteLength(output)}`;
      } else if (r.status === "error") json += `,"error":${JSON.stringify(r.error)}`;
      if (typeof r.durationMs === "number" && Number.isFinite(r.durationMs))
        json += `,"duration_ms":${r.durationMs}`;
      if (r.poolId !== undefined && r.poolId !== null) {
        // a batch's results mostly come from one pool: its id is escaped once
        if (r.poolId !== lastPoolId) {
          lastPoolId = r.poolId;
          lastPoolJson = JSON.stringify(r.poolId);
        }
        json += `,"pool_id":${lastPoolJson}`;
      }
      if (r.usage !== undefined) json += `,"usage":${JSON.stringify(r.usage)}`;
      json += "}";
    }
    json += "]";

    // One statement, so one round trip that commits by itself (see sql/functions/complete_results.sql).
    const rows = await this.sql.runTuples<CompletionTuple>("complete_attempts", [
      json,
      claim?.brokerId ?? null,
      claim?.poolId ?? null,
      claim?.handlers ?? null,
      claim === undefined ? 0 : Math.max(0, Math.min(Math.floor(claim.limit), 100_000)),
    ]);
    return judgeCompletion(rows.map(completionRow), outcomes, valid, attemptIds);
  }

  /**
   * Extends, by its step's timeout from now, the lease of each attempt that
   * still holds one (and, with `poolId`, was sent to that pool). Returns the
   * attempt ids that hold no lease any more, so the broker can cancel them.
   */
  async extendLeases(attemptIds: string[], poolId?: string): Promise<string[]> {
    const valid = attemptIds.filter(isUuid).map((id) => id.toLowerCase());
    const extended = new Set(
      valid.length === 0
        ? []
        : (await this.sql.run<{ attempt_id: string }>("extend_leases", [valid, poolId ?? null])).map(
            (r) => r.attempt_id,
          ),
    );
    return attemptIds.filter((id) => !extended.has(id.toLowerCase()));
  }

  /**
   * A pool reconnected (to this broker or a new life of it) and listed the
   * attempts it still holds: those that still hold their step's lease are
   * renewed under this broker's id and returned, so the broker counts them in
   * flight at that pool and will store their results. The others are refused
   * later as stale. With `poolId`, only attempts sent to that pool are adopted.
   */
  async adoptAttempts(attemptIds: string[], brokerId: string, poolId?: string): Promise<AdoptedAttempt[]> {
    const ids = attemptIds.filter(isUuid).map((id) => id.toLowerCase());
    if (ids.length === 0) return [];
    const rows = await this.sql.run<{
      attempt_id: string;
      step_id: string;
      task_id: string;
      step_name: string;
      handler: string;
      attempt: number;
      max_attempts: number;
    }>("adopt_attempts", [ids, brokerId, poolId ?? null]);
    return rows.map((r) => ({
      attemptId: r.attempt_id,
      stepId: r.step_id,
      taskId: r.task_id,
      stepName: r.step_name,
      handler: r.handler,
      attempt: r.attempt,
      maxAttempts: r.max_attempts,
    }));
  }

  /**
   * The attempts among `attemptIds` that were sent to another pool than
   * `poolId`, each with the pool it was sent to: what one pool may not
   * report, extend, hand back or adopt.
   */
  async foreignAttempts(attemptIds: string[], poolId: string): Promise<Map<string, string>> {
    const ids = attemptIds.filter(isUuid).map((id) => id.toLowerCase());
    if (ids.length === 0) return new Map();
    const rows = await this.sql.run<{ attempt_id: string; pool_id: string }>("foreign_attempts", [
      ids,
      poolId,
    ]);
    return new Map(rows.map((r) => [r.attempt_id, r.pool_id]));
  }

  /**
   * Judges a HELLO's session (the sha256 hex of its secret, null when it sent
   * none) against the one on record for the pool_id, and records it when it
   * may take the pool_id (see take_pool_session() in sql/functions).
   */
  async takePoolSession(poolId: string, sessionHash: string | null): Promise<PoolSessionOutcome> {
    const rows = await this.sql.run<{ outcome: PoolSessionOutcome }>("take_pool_session", [
      poolId,
      sessionHash,
    ]);
    const outcome = rows[0]?.outcome;
    if (outcome === undefined) throw new Error("take_pool_session returned no row");
    return outcome;
  }
}
