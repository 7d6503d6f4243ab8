/**
 * The shapes the state manager takes and returns. Views that go on the wire
 * (TaskView, StepView, ClaimedStep) use the protocol's snake_case keys and
 * ISO timestamps, so the broker can send them as they are; the rest is camelCase.
 */
import type { AckOutcome, CancelReason, ResultStatus, StepState, TaskState } from "../../protocol/constants";

export type JsonValue = null | boolean | number | string | JsonValue[] | { [key: string]: JsonValue };
export type JsonObject = { [key: string]: JsonValue };

export interface TemplateRef {
  namespace: string;
  name: string;
  version: string;
}

/** A step of a template after registration: every default filled in. */
export interface TemplateStep {
  name: string;
  handler: string;
  description?: string;
  depends_on: string[];
  config: JsonObject;
  timeout_ms: number;
  retry: {
    max_attempts: number;
    retryable: boolean;
    backoff: { initial_ms: number; multiplier: number; max_ms: number; jitter: number };
  };
}

export interface TemplateDefinition extends TemplateRef {
  description?: string;
  steps: TemplateStep[];
}

export interface TemplateRecord extends TemplateRef {
  id: number;
  definition: TemplateDefinition;
  createdAt: string;
}

export interface CreateTaskRequest {
  namespace: string;
  name: string;
  /** Default: the version registered last. */
  version?: string;
  context: JsonObject;
  /** A second request with the same key returns the first task. */
  idempotencyKey?: string;
  /** Higher runs first. Default 0. */
  priority?: number;
  /** The caller's W3C trace context (PROTOCOL.md, Trace context); without it the task's trace id comes from its id. */
  traceparent?: string;
  tracestate?: string;
}

/** A create request whose template was found and which passed every check, ready for one create statement. */
export interface PreparedTask {
  request: CreateTaskRequest;
  template: TemplateRecord;
  /** Rows it inserts (the task, its steps, its edges): what bounds the statement it goes into. */
  rows: number;
}

/** What checking a create request came to: ready to insert, or the reason it cannot be created. */
export type PreparedCreate = PreparedTask | { request: CreateTaskRequest; error: Error };

/** One step's error, as handlers report it (protocol `step_error`). */
export interface StepError {
  type: string;
  message: string;
  retryable: boolean;
  retry_after_ms?: number;
  details?: JsonObject;
}

export interface TaskError {
  message: string;
  failed_steps: string[];
}

/** protocol/schemas/common.json#/$defs/step_view */
export interface StepView {
  step_id: string;
  name: string;
  handler: string;
  state: StepState;
  depends_on: string[];
  attempts: number;
  max_attempts: number;
  /** Present only when the step stored an output (which may be null). */
  output?: JsonValue;
  error: StepError | null;
}

/** protocol/schemas/common.json#/$defs/task_view */
export interface TaskView {
  task_id: string;
  template: TemplateRef;
  state: TaskState;
  priority: number;
  context: JsonObject;
  idempotency_key: string | null;
  created_at: string;
  finished_at: string | null;
  error: TaskError | null;
  steps?: StepView[];
}

export interface ClaimRequest {
  brokerId: string;
  /** Handlers some connected pool serves; only their steps are claimed. */
  handlers: string[];
  limit: number;
  /** Claim only among these steps (e.g. the ones a commit just readied). */
  stepIds?: string[];
  /** The pool the claimed attempts will be sent to, recorded on each attempt row so a lost attempt names its pool. */
  poolId?: string;
  /** Steps not to claim (their last attempt timed out at this pool, and another pool can take them). */
  avoidStepIds?: string[];
}

/** One attempt to run: the fields of a STEP message item, plus the lease expiry. */
export interface ClaimedStep {
  task_id: string;
  step_id: string;
  attempt_id: string;
  step_name: string;
  handler: string;
  attempt: number;
  max_attempts: number;
  timeout_ms: number;
  template: TemplateRef;
  context: JsonObject;
  config: JsonObject;
  /** Parent outputs keyed by parent step name; null where a parent stored none. */
  inputs: { [stepName: string]: JsonValue };
  lease_expires_at: string;
  /** How many steps depend on this one (for the broker's credit; not part of STEP). */
  children: number;
  /** The task's trace context as submitted (null: none); STEP carries the attempt's, built from it. */
  traceparent?: string | null;
  tracestate?: string | null;
}

export interface Usage {
  cost?: number;
  tokens?: number;
  artifacts?: string[];
}

/** One RESULT item. `output` is required (and may be null) when status is complete. */
export interface AttemptResult {
  attemptId: string;
  status: ResultStatus;
  output?: JsonValue;
  error?: StepError;
  durationMs?: number;
  usage?: Usage;
  poolId?: string;
}

export interface AttemptOutcome {
  attemptId: string;
  outcome: AckOutcome;
  stepId?: string;
  taskId?: string;
  /** The step's new state, when outcome is "stored". */
  state?: StepState;
}

/** A step that became ready. With a backoff, runAt is in the future: dispatch it then. */
export interface ReadiedStep {
  stepId: string;
  taskId: string;
  handler: string;
  runAt: string;
}

export interface FinishedTask {
  taskId: string;
  state: TaskState;
  error: TaskError | null;
}

/**
 * Claim, in the same transaction as a batch of results, the children those
 * results make ready: up to `limit` of them whose handler the pool serves.
 */
export interface ChildClaim {
  brokerId: string;
  poolId: string;
  handlers: string[];
  limit: number;
}

export interface CompletionResult {
  /** One per result, in the order given. */
  outcomes: AttemptOutcome[];
  /** Steps that became ready and were not claimed with the batch. */
  readied: ReadiedStep[];
  /** Children claimed with the batch (see ChildClaim), to be sent to its pool. */
  claimed: ClaimedStep[];
  finishedTasks: FinishedTask[];
}

/** An attempt taken back from its step (expired, released, orphaned). */
export interface RequeuedAttempt {
  attemptId: string;
  stepId: string;
  taskId: string;
  handler: string;
  /** ready (a retry, at runAt) or error (no attempt left, or retries forbidden). */
  state: StepState;
  runAt: string;
  brokerId: string;
  poolId: string | null;
}

export type ExpiredAttempt = RequeuedAttempt;

/** An attempt a reconnecting pool still held, and whose lease it keeps. */
export interface AdoptedAttempt {
  attemptId: string;
  stepId: string;
  taskId: string;
  stepName: string;
  handler: string;
  attempt: number;
  maxAttempts: number;
}

/**
 * How a HELLO's session fared against the one on record for its pool_id
 * (take_pool_session() in sql/functions): `held` refuses it, every other
 * outcome lets the pool register.
 */
export type PoolSessionOutcome = "none" | "new" | "same" | "held" | "released" | "replaced";

export interface RequeueResult {
  attempts: RequeuedAttempt[];
  finishedTasks: FinishedTask[];
}

export interface AttemptRecord {
  attemptId: string;
  stepId: string;
  taskId: string;
  stepName: string;
  attempt: number;
  brokerId: string;
  poolId: string | null;
  startedAt: string;
  finishedAt: string | null;
  durationMs: number | null;
  outcome: "complete" | "error" | "timeout" | "lost" | "undelivered" | "cancelled" | null;
  error: StepError | null;
  outputBytes: number | null;
  usage: Usage;
}

export type ExplainConditionName = "parents" | "state" | "attempts" | "backoff" | "lease" | "pool";

export interface ExplainCondition {
  name: ExplainConditionName;
  ok: boolean;
  detail: string;
}

export interface ExplainRow {
  stepId: string;
  name: string;
  handler: string;
  state: StepState;
  attempts: number;
  maxAttempts: number;
  /** Every readiness condition, in the order they are judged. */
  conditions: ExplainCondition[];
  /** The first condition that fails (null: the step can be dispatched now). */
  blockedBy: ExplainConditionName | null;
}

export interface WorkNotification {
  /** reconnected: the listening connection was lost and is back; work may have been created meanwhile. */
  reason: "created" | "retried" | "resolved" | "reconnected";
}

/** What a broker says about itself when it registers (BrokerRegistry.registerBroker). */
export interface BrokerRegistration {
  brokerId: string;
  /** Where its pools and clients connect, as bound. */
  endpoints: string[];
  /** The stepbroker version it runs. */
  version: string;
  pid: number;
  host: string;
}

/** A brokers row as `stepbroker brokers` shows it (BrokerRegistry.listBrokers). */
export interface BrokerRecord extends BrokerRegistration {
  startedAt: string;
  lastHeartbeatAt: string;
  /** Set by a clean stop (markBrokerStopped); null while it runs or after it died. */
  stoppedAt: string | null;
  /** Milliseconds since its last heartbeat, by the database's clock. */
  heartbeatAgeMs: number;
  /** Not stopped, and heartbeat within the bound (deadAfterMs) of the listing. */
  alive: boolean;
  /** Its status in one word: alive, dead (silent for the bound) or stopped. */
  status: "alive" | "dead" | "stopped";
  /** In-flight steps it leases now. */
  inFlight: number;
}

/** An attempt taken back from a dead, stopped or unregistered broker (BrokerRegistry.reclaimDeadBrokers). */
export interface ReclaimedAttempt {
  attemptId: string;
  taskId: string;
  stepId: string;
  /** The broker that leased it. */
  fromBrokerId: string;
  /** Milliseconds since that broker's last heartbeat, by the database's clock (null: it has no brokers row). */
  fromHeartbeatAgeMs: number | null;
  /** The step's new state: ready (runs again) or error (no attempt left). */
  state: StepState;
}

/** An attempt named in a cancel event, with the broker whose pool runs it. */
export interface EventAttempt {
  attemptId: string;
  taskId: string;
  /** The broker that leased it: the one that must tell its pool. */
  brokerId: string;
}

/**
 * What brokers sharing a database tell each other (StateManager.listenForEvents).
 *  - cancel: these attempts no longer hold their lease (the task was cancelled,
 *    the lease expired under another broker, or it was reclaimed from a broker
 *    thought dead); the broker named by each attempt sends CANCEL with
 *    `reason` to the pool running it, others ignore it. Big cancels arrive as
 *    several events.
 *  - finished: a task reached a terminal state (complete, error, cancelled),
 *    whichever broker finished it: answer the WAITs held for it.
 *  - reconnected: the listening connection was lost and is back; events sent
 *    meanwhile are gone, so re-check the waits and attempts held.
 */
export type BrokerEvent =
  | { kind: "cancel"; reason: CancelReason; attempts: EventAttempt[] }
  | { kind: "finished"; taskId: string; state: TaskState }
  | { kind: "reconnected" };
