/**
 * What the state manager's queries return (pg's shapes: timestamptz as Date,
 * jsonb parsed) and the mappers from those rows to the types of ./types.
 * The hot queries (claim_steps, complete_attempts) return their timestamps as
 * ISO 8601 text already (see UTC_ISO_TEXT in those files): the driver's
 * timestamptz parser and toISOString after it were a visible part of the
 * broker's CPU per step, for a value it only passes on as text.
 */
import type { StepState, TaskState } from "../../protocol/constants";
import type {
  AttemptRecord,
  ClaimedStep,
  FinishedTask,
  JsonObject,
  JsonValue,
  ReadiedStep,
  StepError,
  TaskError,
  TemplateDefinition,
  TemplateRef,
} from "./types";

export const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
export const isUuid = (s: unknown): s is string => typeof s === "string" && UUID.test(s);
export const INT4_MAX = 2_147_483_647;

// Row shapes of the queries (what pg returns: timestamptz as Date, jsonb parsed).
export interface TemplateRow {
  id: number;
  namespace: string;
  name: string;
  version: string;
  definition: TemplateDefinition;
  created_at: Date;
}
/** A claimed_step as JSON (a `claimed` row of complete_results): the lease expiry as jsonb writes a timestamptz. */
export type ClaimJson = ClaimedStep;
/** A claim_steps row as an array (StateSql.runTuples), in the order of sql/queries/claim_steps.sql's select list. */
export type ClaimTuple = [
  task_id: string,
  step_id: string,
  attempt_id: string,
  step_name: string,
  handler: string,
  attempt: number,
  max_attempts: number,
  timeout_ms: number,
  template: TemplateRef,
  context: JsonObject,
  config: JsonObject,
  inputs: ClaimedStep["inputs"],
  lease_expires_at: string,
  children: number,
  traceparent: string | null,
  tracestate: string | null,
];
/** A complete_attempts row as an array, in the order of sql/queries/complete_attempts.sql's select list. */
export type CompletionTuple = [
  kind: CompletionRow["kind"],
  attempt_id: string | null,
  prior_outcome: string | null,
  step_id: string | null,
  task_id: string | null,
  state: StepState | null,
  handler: string | null,
  run_at: string | null,
  error: TaskError | null,
  claim: ClaimJson | null,
];
export interface CompletionRow {
  kind: "stored" | "known" | "readied" | "claimed" | "ended";
  attempt_id: string | null;
  /** kind known: how the attempt ended before this batch (null: not finished, or no such attempt). */
  prior_outcome: string | null;
  step_id: string | null;
  task_id: string | null;
  state: StepState | null;
  handler: string | null;
  /** As toISOString writes it; only when the step is ready (stored for a retry, or readied), else null. */
  run_at: string | null;
  /** kind claimed: the claim row. */
  claim: ClaimJson | null;
  /** kind ended: the task's error (null when it completed). */
  error: TaskError | null;
}
export interface FinalizeRow {
  task_id: string;
  state: TaskState;
  error: TaskError | null;
}
export interface RequeueRow {
  attempt_id: string;
  step_id: string;
  task_id: string;
  handler: string;
  state: StepState;
  run_at: Date;
  broker_id: string;
  pool_id: string | null;
}
export interface StepChangeRow {
  kind?: "resolved" | "readied";
  step_id: string;
  task_id: string;
  handler: string;
  state: StepState;
  run_at: Date;
}
export interface TaskRow {
  id: string;
  state: TaskState;
  context: JsonObject;
  priority: number;
  idempotency_key: string | null;
  error: TaskError | null;
  created_at: Date;
  finished_at: Date | null;
  namespace: string;
  name: string;
  version: string;
}
export interface StepRow {
  task_id: string;
  id: string;
  position: number;
  name: string;
  handler: string;
  state: StepState;
  attempts: number;
  max_attempts: number;
  retryable: boolean;
  has_output: boolean;
  output: JsonValue;
  error: StepError | null;
  run_at: Date;
  pending_parents: number;
  timeout_ms: number;
  lease_attempt_id: string | null;
  lease_broker_id: string | null;
  lease_expires_at: Date | null;
  parents: { name: string; state: StepState }[];
  db_now: Date;
}
export interface AttemptRow {
  attempt_id: string;
  step_id: string;
  task_id: string;
  step_name: string;
  attempt: number;
  broker_id: string;
  pool_id: string | null;
  started_at: Date;
  finished_at: Date | null;
  duration_ms: number | null;
  outcome: AttemptRecord["outcome"];
  error: StepError | null;
  output_bytes: number | null;
  cost: number | null;
  tokens: number | null;
  artifacts: string[] | null;
}

export function iso(d: Date): string {
  return d.toISOString();
}

/** A claim_steps row, taken by position. */
export function claimedTuple(t: ClaimTuple): ClaimedStep {
  return {
    task_id: t[0],
    step_id: t[1],
    attempt_id: t[2],
    step_name: t[3],
    handler: t[4],
    attempt: t[5],
    max_attempts: t[6],
    timeout_ms: t[7],
    template: t[8],
    context: t[9],
    config: t[10],
    inputs: t[11],
    lease_expires_at: t[12],
    children: t[13],
    traceparent: t[14],
    tracestate: t[15],
  };
}

/** A complete_attempts row, taken by position: an object literal, one shape for every row. */
export function completionRow(t: CompletionTuple): CompletionRow {
  return {
    kind: t[0],
    attempt_id: t[1],
    prior_outcome: t[2],
    step_id: t[3],
    task_id: t[4],
    state: t[5],
    handler: t[6],
    run_at: t[7],
    error: t[8],
    claim: t[9],
  };
}

/** `leaseExpiresAt` as toISOString writes it. */
export function claimedStep(r: ClaimJson, leaseExpiresAt: string): ClaimedStep {
  return {
    task_id: r.task_id,
    step_id: r.step_id,
    attempt_id: r.attempt_id,
    step_name: r.step_name,
    handler: r.handler,
    attempt: r.attempt,
    max_attempts: r.max_attempts,
    timeout_ms: r.timeout_ms,
    template: r.template,
    context: r.context,
    config: r.config,
    inputs: r.inputs,
    lease_expires_at: leaseExpiresAt,
    children: r.children,
    traceparent: r.traceparent ?? null,
    tracestate: r.tracestate ?? null,
  };
}

export function readied(row: StepChangeRow | CompletionRow): ReadiedStep {
  return {
    stepId: row.step_id ?? "",
    taskId: row.task_id ?? "",
    handler: row.handler ?? "",
    runAt: row.run_at === null ? "" : typeof row.run_at === "string" ? row.run_at : iso(row.run_at),
  };
}

/** An `ended` row of complete_results: a task the batch finished. */
export function ended(row: CompletionRow): FinishedTask {
  return { taskId: row.task_id ?? "", state: row.state as TaskState, error: row.error };
}

export function isJsonObject(value: unknown): value is JsonObject {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}
