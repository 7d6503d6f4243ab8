/**
 * The state manager: the only code that writes step or task state. Every
 * method is one short transaction (or one statement) of set-based SQL from
 * sql/queries/; PostgreSQL is the only durable truth, so any number of brokers
 * may share it.
 *
 * Locking discipline (why there are no lost finalizations and no deadlocks):
 *  - whatever may finish a task (completion, expiry, release, recovery, cancel,
 *    retry, resolve) first locks the affected task rows, in id order, in a
 *    statement of its own; the statements after it then see every concurrent
 *    change to those tasks' steps, so "is any step still runnable?" is never
 *    answered from a stale snapshot;
 *  - claims never wait: ready steps and pending task rows are taken with
 *    SKIP LOCKED;
 *  - a transaction that still deadlocks is rolled back and run again.
 */
import { randomUUID } from "node:crypto";
import type pg from "pg";
import {
  AckOutcomes,
  type AckOutcome,
  type StepState,
  StepStates,
  type TaskState,
  TaskStates,
} from "../../protocol/constants";
import { coerceError } from "../db/errors";
import type { Logger } from "../db/logger";
import { migrateSchema } from "../db/migrate";
import { type Database, type OpenDatabaseOptions, openDatabase } from "../db/openDatabase";
import { type Query, type QueryName, loadQueries } from "../db/queries";
import { runStatement, withTransaction } from "../db/transaction";
import { uuidv7 } from "../db/uuid7";
import { StateError } from "./errors";
import { type ExplainInput, explainSteps, failedAncestors } from "./explain";
import { TemplateError, TemplateErrorCodes, validateTemplate } from "./templates";
import { AttemptEndings, TransitionEvents } from "./transitions";
import { listenReconnecting } from "./workListener";
import type {
  AdoptedAttempt,
  AttemptOutcome,
  AttemptRecord,
  AttemptResult,
  ChildClaim,
  ClaimRequest,
  ClaimedStep,
  CompletionResult,
  CreateTaskRequest,
  ExpiredAttempt,
  ExplainRow,
  FinishedTask,
  JsonObject,
  JsonValue,
  PoolSessionOutcome,
  ReadiedStep,
  RequeueResult,
  RequeuedAttempt,
  StepError,
  StepView,
  TaskError,
  TaskView,
  TemplateDefinition,
  TemplateRecord,
  Usage,
  WorkNotification,
} from "./types";

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const isUuid = (s: unknown): s is string => typeof s === "string" && UUID.test(s);
const INT4_MAX = 2_147_483_647;
/** Most attempts one expireLeases / recoverOrphans call takes back; the rest wait for the next call. */
const REQUEUE_BATCH = 10_000;

export interface StateManagerOptions {
  logger?: Logger;
}

// Row shapes of the queries (what pg returns: timestamptz as Date, jsonb parsed).
interface TemplateRow {
  id: number;
  namespace: string;
  name: string;
  version: string;
  definition: TemplateDefinition;
  created_at: Date;
}
/** A claim_steps row: a ClaimedStep whose lease expiry is still a Date. */
type ClaimRow = Omit<ClaimedStep, "lease_expires_at"> & { lease_expires_at: Date };
/** A claimed_step as JSON (a `claimed` row of complete_results): the lease expiry is a string. */
type ClaimJson = Omit<ClaimedStep, "lease_expires_at"> & { lease_expires_at: string };
interface CompletionRow {
  kind: "stored" | "known" | "readied" | "claimed" | "ended";
  attempt_id: string | null;
  /** kind known: how the attempt ended before this batch (null: not finished, or no such attempt). */
  prior_outcome: string | null;
  step_id: string | null;
  task_id: string | null;
  state: StepState | null;
  handler: string | null;
  run_at: Date | null;
  /** kind claimed: the claim row. */
  claim: ClaimJson | null;
  /** kind ended: the task's error (null when it completed). */
  error: TaskError | null;
}
interface FinalizeRow {
  task_id: string;
  state: TaskState;
  error: TaskError | null;
}
interface RequeueRow {
  attempt_id: string;
  step_id: string;
  task_id: string;
  handler: string;
  state: StepState;
  run_at: Date;
  broker_id: string;
  pool_id: string | null;
}
interface StepChangeRow {
  kind?: "resolved" | "readied";
  step_id: string;
  task_id: string;
  handler: string;
  state: StepState;
  run_at: Date;
}
interface TaskRow {
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
interface StepRow {
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
interface AttemptRow {
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

/** How one requeue (expiry, release, recovery) treats the attempts it takes back. */
interface RequeueMode {
  ending: typeof AttemptEndings.TIMEOUT | typeof AttemptEndings.LOST | typeof AttemptEndings.UNDELIVERED;
  countAttempt: boolean;
  backoff: boolean;
  onlyExpired: boolean;
  reason: string;
  event: string;
}

function iso(d: Date): string {
  return d.toISOString();
}

function claimedStep(r: ClaimRow | ClaimJson): ClaimedStep {
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
    lease_expires_at: iso(new Date(r.lease_expires_at)),
    children: r.children,
  };
}

function readied(row: StepChangeRow | CompletionRow): ReadiedStep {
  return {
    stepId: row.step_id ?? "",
    taskId: row.task_id ?? "",
    handler: row.handler ?? "",
    runAt: row.run_at ? iso(row.run_at) : "",
  };
}

/** An `ended` row of complete_results: a task the batch finished. */
function ended(row: CompletionRow): FinishedTask {
  return { taskId: row.task_id ?? "", state: row.state as TaskState, error: row.error };
}

function isJsonObject(value: unknown): value is JsonObject {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

export class StateManager {
  readonly db: Database;
  /** NOTIFY channel for work created by any process (per schema; at most 63 characters). */
  readonly workChannel: string;
  private readonly logger: Logger;
  private readonly queries: Readonly<Record<QueryName, Query>>;
  /**
   * Names this state manager in the notifications it sends, so that its own
   * listeners skip them: they are woken directly once the change has committed
   * (see wakeLocal), a round trip sooner, and exactly once.
   */
  private readonly origin = randomUUID();
  private readonly localListeners = new Set<(notification: WorkNotification) => void>();
  /** Registered templates by id and by "namespace\0name\0version": versions are immutable, so this never goes stale. */
  private readonly templates = new Map<string, TemplateRecord>();

  constructor(db: Database, options: StateManagerOptions = {}) {
    this.db = db;
    this.logger = options.logger ?? db.logger;
    this.queries = loadQueries();
    this.workChannel = `work_${db.schema}`.slice(0, 63);
  }

  /** Opens the database (embedded unless a URL is given), applies pending migrations, and returns a state manager that owns the database. */
  static async open(options: OpenDatabaseOptions = {}): Promise<StateManager> {
    const db = await openDatabase(options);
    try {
      const manager = new StateManager(db, options.logger ? { logger: options.logger } : {});
      await manager.migrate();
      return manager;
    } catch (thrown) {
      await db.close();
      throw new Error("could not open the state manager", { cause: thrown });
    }
  }

  /** Closes the database this manager was given (and stops an embedded server). */
  async close(): Promise<void> {
    await this.db.close();
  }

  private statement(name: QueryName, values: unknown[]): pg.QueryConfig {
    const q = this.queries[name];
    return { name: q.name, text: q.text, values };
  }

  private async run<R extends pg.QueryResultRow>(name: QueryName, values: unknown[]): Promise<R[]> {
    return (await runStatement<R>(this.db.pool, name, this.statement(name, values))).rows;
  }

  private async runIn<R extends pg.QueryResultRow>(
    client: pg.PoolClient,
    name: QueryName,
    values: unknown[],
  ): Promise<R[]> {
    return (await client.query<R>(this.statement(name, values))).rows;
  }

  /** A transaction; a deliberate refusal (StateError, TemplateError) comes out as itself, not wrapped. */
  private async transaction<T>(label: string, work: (client: pg.PoolClient) => Promise<T>): Promise<T> {
    try {
      return await withTransaction(this.db.pool, label, this.logger, work);
    } catch (err) {
      const cause = err instanceof Error ? err.cause : undefined;
      if (cause instanceof StateError || cause instanceof TemplateError) throw cause;
      throw err;
    }
  }

  private async finalize(client: pg.PoolClient, taskIds: Iterable<string>): Promise<FinishedTask[]> {
    const ids = [...new Set(taskIds)];
    if (ids.length === 0) return [];
    const rows = await this.runIn<FinalizeRow>(client, "finalize_tasks", [ids]);
    return rows.map((r) => ({ taskId: r.task_id, state: r.state, error: r.error }));
  }

  // ---------------------------------------------------------------- schema

  /** Applies pending migrations; returns the names of those applied now. */
  async migrate(): Promise<string[]> {
    const client = await this.db.pool.connect();
    try {
      return await migrateSchema(client, this.db.schema, this.logger);
    } finally {
      client.release();
    }
  }

  // ---------------------------------------------------------------- templates

  private remember(row: TemplateRow): TemplateRecord {
    const record: TemplateRecord = {
      id: row.id,
      namespace: row.namespace,
      name: row.name,
      version: row.version,
      definition: row.definition,
      createdAt: iso(row.created_at),
    };
    this.templates.set(`${row.namespace}\0${row.name}\0${row.version}`, record);
    this.templates.set(`#${row.id}`, record);
    return record;
  }

  /**
   * Validates and registers a template. Registering the same definition again
   * returns the existing record; a different definition under a registered
   * namespace/name/version is refused (TemplateError template_conflict).
   */
  async registerTemplate(definition: unknown): Promise<TemplateRecord> {
    const normalized = validateTemplate(definition);
    const values = [normalized.namespace, normalized.name, normalized.version, JSON.stringify(normalized)];
    // A concurrent registration of the same triple is invisible to the statement that waited for it: look again.
    for (let run = 0; run < 3; run++) {
      const [row] = await this.run<TemplateRow & { inserted: boolean; same: boolean }>(
        "insert_template",
        values,
      );
      if (row === undefined) continue;
      if (!row.same) {
        const ref = `${normalized.namespace}/${normalized.name}@${normalized.version}`;
        throw new TemplateError(ref, [
          {
            code: TemplateErrorCodes.CONFLICT,
            path: "",
            message: `${ref} is already registered with a different definition; register a new version instead`,
          },
        ]);
      }
      if (row.inserted)
        this.logger.info({ template: `${row.namespace}/${row.name}@${row.version}` }, "registered template");
      return this.remember(row);
    }
    throw new Error(
      `registering template ${normalized.namespace}/${normalized.name}@${normalized.version} kept conflicting`,
    );
  }

  /** A registered template; without a version, the one registered last. */
  async getTemplate(namespace: string, name: string, version?: string): Promise<TemplateRecord> {
    if (version !== undefined) {
      const cached = this.templates.get(`${namespace}\0${name}\0${version}`);
      if (cached !== undefined) return cached;
    }
    const [row] = await this.run<TemplateRow>("get_template", [namespace, name, version ?? null]);
    if (row === undefined) {
      throw new StateError(
        "unknown_template",
        `no template ${namespace}/${name}${version === undefined ? "" : `@${version}`} is registered`,
      );
    }
    return this.remember(row);
  }

  // ---------------------------------------------------------------- tasks

  private checkRequest(req: CreateTaskRequest): void {
    if (!isJsonObject(req.context))
      throw new StateError("invalid_request", "a task's context must be a JSON object");
    const priority = req.priority ?? 0;
    if (!Number.isInteger(priority) || Math.abs(priority) > INT4_MAX) {
      throw new StateError("invalid_request", `priority must be an integer (got ${String(req.priority)})`);
    }
    if (
      req.idempotencyKey !== undefined &&
      (req.idempotencyKey.length === 0 || req.idempotencyKey.length > 256)
    ) {
      throw new StateError("invalid_request", "an idempotency key has 1 to 256 characters");
    }
  }

  /**
   * Inserts tasks with all their steps in one statement; returns the task id
   * of each request, in order (the existing task's id for a known idempotency key).
   */
  async createTasks(requests: CreateTaskRequest[]): Promise<string[]> {
    return (await this.insertTasks(requests)).map((t) => t.id);
  }

  /**
   * Creates one task from a registered template (the latest version when none
   * is given). A known idempotency key returns the existing task, created=false.
   */
  async createTask(request: CreateTaskRequest): Promise<{ task: TaskView; created: boolean }> {
    const [inserted] = await this.insertTasks([request]);
    if (inserted === undefined) throw new Error("insertTasks returned nothing");
    const task = await this.getTask(inserted.id, { includeSteps: true });
    if (task === null) throw new Error(`task ${inserted.id} vanished right after it was created`);
    return { task, created: inserted.created };
  }

  private async insertTasks(requests: CreateTaskRequest[]): Promise<{ id: string; created: boolean }[]> {
    if (requests.length === 0) return [];
    const latest = new Map<string, Promise<TemplateRecord>>();
    const templates = await Promise.all(
      requests.map((req) => {
        this.checkRequest(req);
        if (req.version !== undefined) return this.getTemplate(req.namespace, req.name, req.version);
        // "latest" is looked up once per batch, so every task of the batch gets the same version
        const key = `${req.namespace}\0${req.name}`;
        let found = latest.get(key);
        if (found === undefined) {
          found = this.getTemplate(req.namespace, req.name);
          latest.set(key, found);
        }
        return found;
      }),
    );
    const ids = requests.map(() => uuidv7());
    const rows = await this.run<{ id: string }>("create_tasks", [
      ids,
      templates.map((t) => t.id),
      requests.map((r) => JSON.stringify(r.context)),
      requests.map((r) => r.priority ?? 0),
      requests.map((r) => r.idempotencyKey ?? null),
      this.workChannel,
      this.notificationPayload("created"),
    ]);
    if (rows.length > 0) this.wakeLocal({ reason: "created" });
    const inserted = new Set(rows.map((r) => r.id));
    if (inserted.size === requests.length) return ids.map((id) => ({ id, created: true }));

    // The others were skipped: their idempotency key belongs to an existing task
    // (or to an earlier request of this batch).
    const keys = requests.flatMap((r, i) =>
      inserted.has(ids[i] ?? "") || r.idempotencyKey === undefined ? [] : [r.idempotencyKey],
    );
    const existing = await this.run<{ id: string; idempotency_key: string }>(
      "find_tasks_by_idempotency_key",
      [keys],
    );
    const byKey = new Map(existing.map((r) => [r.idempotency_key, r.id]));
    return requests.map((r, i) => {
      const id = ids[i] ?? "";
      if (inserted.has(id)) return { id, created: true };
      const found = r.idempotencyKey === undefined ? undefined : byKey.get(r.idempotencyKey);
      if (found === undefined)
        throw new Error(`task of request ${i} was neither inserted nor found by its idempotency key`);
      return { id: found, created: false };
    });
  }

  // ---------------------------------------------------------------- dispatch

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
    const rows = await this.run<ClaimRow>("claim_steps", [
      request.brokerId,
      request.handlers,
      limit,
      stepIds,
      request.poolId ?? null,
    ]);
    return rows.map(claimedStep);
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

    const attemptIds: string[] = [];
    const statuses: string[] = [];
    const outputs: (string | null)[] = [];
    const errors: (string | null)[] = [];
    const durations: (number | null)[] = [];
    const poolIds: (string | null)[] = [];
    const usages: (string | null)[] = [];
    const outputBytes: (number | null)[] = [];
    for (const i of valid) {
      const r = results[i] as AttemptResult;
      const output = r.status === "complete" ? JSON.stringify(r.output) : null;
      attemptIds.push(r.attemptId.toLowerCase());
      statuses.push(r.status);
      outputs.push(output);
      errors.push(r.status === "error" ? JSON.stringify(r.error) : null);
      durations.push(typeof r.durationMs === "number" && Number.isFinite(r.durationMs) ? r.durationMs : null);
      poolIds.push(r.poolId ?? null);
      usages.push(r.usage === undefined ? null : JSON.stringify(r.usage));
      outputBytes.push(output === null ? null : Buffer.byteLength(output));
    }

    // One statement, so one round trip that commits by itself (see complete_results in migration 0005).
    const rows = await this.run<CompletionRow>("complete_attempts", [
      attemptIds,
      statuses,
      outputs,
      errors,
      durations,
      poolIds,
      usages,
      outputBytes,
      claim?.brokerId ?? null,
      claim?.poolId ?? null,
      claim?.handlers ?? null,
      claim === undefined ? 0 : Math.max(0, Math.min(Math.floor(claim.limit), 100_000)),
    ]);
    const readiedSteps: ReadiedStep[] = [];
    const claimed: ClaimedStep[] = [];
    const finishedTasks: FinishedTask[] = [];
    const stored = new Map<string, CompletionRow>();
    const known = new Map<string, CompletionRow>();
    for (const row of rows) {
      if (row.kind === "readied") readiedSteps.push(readied(row));
      else if (row.kind === "claimed" && row.claim !== null) claimed.push(claimedStep(row.claim));
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

  /**
   * Extends, by its step's timeout from now, the lease of each attempt that
   * still holds one (and, with `poolId`, was sent to that pool). Returns the attempt ids that hold no lease any more, so
   * the broker can cancel them.
   */
  async extendLeases(attemptIds: string[], poolId?: string): Promise<string[]> {
    const valid = attemptIds.filter(isUuid).map((id) => id.toLowerCase());
    const extended = new Set(
      valid.length === 0
        ? []
        : (await this.run<{ attempt_id: string }>("extend_leases", [valid, poolId ?? null])).map(
            (r) => r.attempt_id,
          ),
    );
    return attemptIds.filter((id) => !extended.has(id.toLowerCase()));
  }

  private async requeue(
    client: pg.PoolClient,
    attemptIds: string[],
    mode: RequeueMode,
  ): Promise<RequeueResult> {
    if (attemptIds.length === 0) return { attempts: [], finishedTasks: [] };
    const rows = await this.runIn<RequeueRow>(client, "requeue_attempts", [
      attemptIds,
      mode.ending,
      mode.countAttempt,
      mode.backoff,
      mode.onlyExpired,
      mode.reason,
      mode.event,
    ]);
    const attempts: RequeuedAttempt[] = rows.map((r) => ({
      attemptId: r.attempt_id,
      stepId: r.step_id,
      taskId: r.task_id,
      handler: r.handler,
      state: r.state,
      runAt: iso(r.run_at),
      brokerId: r.broker_id,
      poolId: r.pool_id,
    }));
    const finishedTasks = await this.finalize(
      client,
      rows.map((r) => r.task_id),
    );
    return { attempts, finishedTasks };
  }

  /**
   * The lease reaper: every in-flight attempt whose lease expired (of this
   * broker only, when brokerId is given) ends as a timeout, and its step follows
   * its retry policy (ready after the backoff, or error). Returns those attempts
   * so the broker can send CANCEL.
   */
  async expireLeases(options: { brokerId?: string; limit?: number } = {}): Promise<ExpiredAttempt[]> {
    const result = await this.transaction("expireLeases", async (client) => {
      const locked = await this.runIn<{ attempt_id: string }>(client, "lock_expired", [
        options.brokerId ?? null,
        options.limit ?? REQUEUE_BATCH,
      ]);
      return await this.requeue(
        client,
        locked.map((r) => r.attempt_id),
        {
          ending: AttemptEndings.TIMEOUT,
          countAttempt: true,
          backoff: true,
          onlyExpired: true,
          reason: "lease expired",
          event: TransitionEvents.TIMED_OUT,
        },
      );
    });
    this.logFinished(result.finishedTasks, "lease expiry");
    return result.attempts;
  }

  /**
   * Puts in-flight steps back to ready at once. countAttempt true: the attempt
   * may have run (its pool died): it counts, and with no attempt left (or
   * retries forbidden) the step fails. countAttempt false: it never reached a
   * handler: the attempt number is given back. Steps whose lease moved to
   * another attempt are not touched.
   */
  async releaseAttempts(
    attemptIds: string[],
    options: { countAttempt: boolean; reason: string },
  ): Promise<RequeueResult> {
    const ids = attemptIds.filter(isUuid).map((id) => id.toLowerCase());
    if (ids.length === 0) return { attempts: [], finishedTasks: [] };
    return await this.transaction("releaseAttempts", async (client) => {
      await this.runIn(client, "lock_tasks_of_attempts", [ids]);
      return await this.requeue(client, ids, {
        ending: options.countAttempt ? AttemptEndings.LOST : AttemptEndings.UNDELIVERED,
        countAttempt: options.countAttempt,
        backoff: false,
        onlyExpired: false,
        reason: options.reason,
        event: TransitionEvents.RELEASED,
      });
    });
  }

  /**
   * At broker start (after a grace period): in-flight steps leased by this
   * broker id before `olderThan` (a previous life of this broker; default: now)
   * or by anyone whose lease expired become ready again, counting the attempt.
   * Pass the broker's start time as olderThan so its own new leases are kept.
   */
  async recoverOrphans(options: {
    brokerId: string;
    olderThan?: Date;
    keep?: string[];
  }): Promise<RequeueResult> {
    const result = await this.transaction("recoverOrphans", async (client) => {
      const locked = await this.runIn<{ attempt_id: string }>(client, "lock_orphans", [
        options.brokerId,
        options.olderThan ?? null,
        REQUEUE_BATCH,
        (options.keep ?? []).filter(isUuid),
      ]);
      return await this.requeue(
        client,
        locked.map((r) => r.attempt_id),
        {
          ending: AttemptEndings.LOST,
          countAttempt: true,
          backoff: false,
          onlyExpired: false,
          reason: "recovered: its broker restarted or its lease expired",
          event: TransitionEvents.RECOVERED,
        },
      );
    });
    if (result.attempts.length > 0) {
      this.logger.info(
        { brokerId: options.brokerId, recovered: result.attempts.length },
        "recovered orphaned attempts",
      );
    }
    return result;
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
    const rows = await this.run<{
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
    const rows = await this.run<{ attempt_id: string; pool_id: string }>("foreign_attempts", [ids, poolId]);
    return new Map(rows.map((r) => [r.attempt_id, r.pool_id]));
  }

  /**
   * Judges a HELLO's session (the sha256 hex of its secret, null when it sent
   * none) against the one on record for the pool_id, and records it when it
   * may take the pool_id (see take_pool_session() in migration 0009).
   */
  async takePoolSession(poolId: string, sessionHash: string | null): Promise<PoolSessionOutcome> {
    const rows = await this.run<{ outcome: PoolSessionOutcome }>("take_pool_session", [poolId, sessionHash]);
    const outcome = rows[0]?.outcome;
    if (outcome === undefined) throw new Error("take_pool_session returned no row");
    return outcome;
  }

  /** Every registered template, as registered (defaults filled in). */
  async listTemplates(): Promise<TemplateDefinition[]> {
    const rows = await this.run<{ definition: TemplateDefinition }>("list_templates", []);
    return rows.map((r) => r.definition);
  }

  private logFinished(tasks: FinishedTask[], why: string): void {
    for (const t of tasks)
      this.logger.info({ taskId: t.taskId, state: t.state, error: t.error }, `task finished after ${why}`);
  }

  // ---------------------------------------------------------------- operators

  private async lockTask(
    client: pg.PoolClient,
    ids: { taskId?: string; stepId?: string },
  ): Promise<{ id: string; state: TaskState } | undefined> {
    const taskId = ids.taskId !== undefined && isUuid(ids.taskId) ? ids.taskId : null;
    const stepId = ids.stepId !== undefined && isUuid(ids.stepId) ? ids.stepId : null;
    if (taskId === null && stepId === null) return undefined;
    const [row] = await this.runIn<{ id: string; state: TaskState }>(client, "lock_task", [taskId, stepId]);
    return row;
  }

  /**
   * Cancels a task: every unfinished step becomes cancelled, and so does the
   * task. Returns the attempts that were in flight, so the broker can tell
   * their pools. A task already finished is left as it is.
   */
  async cancelTask(taskId: string): Promise<{ cancelledAttempts: string[]; state: TaskState }> {
    return await this.transaction("cancelTask", async (client) => {
      const task = await this.lockTask(client, { taskId });
      if (task === undefined) throw new StateError("unknown_task", `no task ${taskId}`);
      if (task.state !== TaskStates.PENDING && task.state !== TaskStates.IN_PROGRESS) {
        return { cancelledAttempts: [], state: task.state };
      }
      const rows = await this.runIn<{ attempt_id: string }>(client, "cancel_task", [task.id]);
      this.logger.info({ taskId, inFlight: rows.length }, "cancelled task");
      return { cancelledAttempts: rows.map((r) => r.attempt_id), state: TaskStates.CANCELLED };
    });
  }

  /**
   * An operator's retry. { stepId }: that error step runs again, attempts reset.
   * { taskId }: all of its error and cancelled steps do (those whose parents are
   * not done wait as pending). The task runs again.
   */
  async retry(
    target: { taskId: string } | { stepId: string },
  ): Promise<{ retried: string[]; readied: ReadiedStep[] }> {
    const result = await this.transaction("retry", async (client) => {
      const task = await this.lockTask(client, target);
      const what = "taskId" in target ? `task ${target.taskId}` : `step ${target.stepId}`;
      if (task === undefined)
        throw new StateError("taskId" in target ? "unknown_task" : "invalid_request", `no ${what}`);
      if (task.state === TaskStates.COMPLETE)
        throw new StateError("invalid_request", `${what}: the task is complete, nothing to retry`);
      if ("stepId" in target && task.state === TaskStates.CANCELLED) {
        throw new StateError("invalid_request", `${what}: its task is cancelled; retry the task instead`);
      }
      const rows = await this.runIn<StepChangeRow>(client, "retry_steps", [
        task.id,
        "stepId" in target ? target.stepId : null,
        this.workChannel,
        this.notificationPayload("retried"),
      ]);
      if (rows.length === 0) {
        throw new StateError(
          "invalid_request",
          "stepId" in target ? `${what} is not in error` : `${what} has no error or cancelled steps`,
        );
      }
      await this.finalize(client, [task.id]);
      return {
        retried: rows.map((r) => r.step_id),
        readied: rows.filter((r) => r.state === StepStates.READY).map(readied),
      };
    });
    this.logger.info({ target, retried: result.retried.length }, "retry");
    if (result.readied.length > 0) this.wakeLocal({ reason: "retried" });
    return result;
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
    const result = await this.transaction("resolveStep", async (client) => {
      const task = await this.lockTask(client, { stepId });
      if (task === undefined) throw new StateError("invalid_request", `no step ${stepId}`);
      if (task.state !== TaskStates.IN_PROGRESS && task.state !== TaskStates.ERROR) {
        throw new StateError(
          "invalid_request",
          `step ${stepId}: its task is ${task.state}; only a running or failed task's steps can be resolved`,
        );
      }
      const steps = await this.runIn<StepRow>(client, "get_steps", [task.id]);
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
      const rows = await this.runIn<StepChangeRow>(client, "resolve_step", [
        step.id,
        output === undefined ? null : JSON.stringify(output),
        this.workChannel,
        this.notificationPayload("resolved"),
      ]);
      const finishedTasks = await this.finalize(client, [task.id]);
      this.logger.info({ stepId, name: step.name, taskId: task.id }, "step resolved manually");
      return { readied: rows.filter((r) => r.kind === "readied").map(readied), finishedTasks };
    });
    if (result.readied.length > 0) this.wakeLocal({ reason: "resolved" });
    return result;
  }

  // ---------------------------------------------------------------- reads

  /** The task as protocol task_view (with its steps when asked), or null. */
  async getTask(taskId: string, options: { includeSteps?: boolean } = {}): Promise<TaskView | null> {
    if (!isUuid(taskId)) return null;
    const [row] = await this.run<TaskRow>("get_task", [taskId]);
    if (row === undefined) return null;
    const view: TaskView = {
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
    if (options.includeSteps) {
      const steps = await this.run<StepRow>("get_steps", [taskId]);
      view.steps = steps.map((s) => {
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
      });
    }
    return view;
  }

  /** Every attempt of a step, or of all steps of a task, oldest first. */
  async getAttempts(stepOrTaskId: string): Promise<AttemptRecord[]> {
    if (!isUuid(stepOrTaskId)) return [];
    const rows = await this.run<AttemptRow>("get_attempts", [stepOrTaskId]);
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
    const steps = isUuid(taskId) ? await this.run<StepRow>("get_steps", [taskId]) : [];
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

  // ---------------------------------------------------------------- notifications

  /**
   * Calls `callback` whenever any process creates a task, retries or resolves
   * steps, so a broker picks up work it did not create. Changes made through
   * this state manager call it directly once committed; those of other
   * processes (and other state managers) arrive by NOTIFY on one dedicated
   * connection, which is reopened if it drops (then `reconnected` says that
   * some may have been missed). The returned function stops listening and
   * closes it.
   */
  async listenForWork(callback: (notification: WorkNotification) => void): Promise<() => Promise<void>> {
    const stopListening = await listenReconnecting({
      newClient: () => this.db.newClient(),
      channel: this.workChannel,
      logger: this.logger,
      onPayload: (payload) => {
        let notification: WorkNotification = { reason: "created" };
        try {
          const parsed: unknown = JSON.parse(payload ?? "{}");
          // Our own change: the listeners were called when it committed.
          if (isJsonObject(parsed) && parsed.origin === this.origin) return;
          if (
            isJsonObject(parsed) &&
            (parsed.reason === "created" || parsed.reason === "retried" || parsed.reason === "resolved")
          ) {
            notification = { reason: parsed.reason };
          }
        } catch {
          // an unexpected payload still means "there may be work"
        }
        this.callListener(callback, notification);
      },
      onReconnect: () => this.callListener(callback, { reason: "reconnected" }),
    });
    this.localListeners.add(callback);
    return async () => {
      this.localListeners.delete(callback);
      await stopListening();
    };
  }

  /** The NOTIFY payload of a change made here: its reason, and this state manager's origin. */
  private notificationPayload(reason: WorkNotification["reason"]): string {
    return JSON.stringify({ reason, origin: this.origin });
  }

  /** Tells this process's listeners about a change that has just committed. */
  private wakeLocal(notification: WorkNotification): void {
    for (const callback of this.localListeners) this.callListener(callback, notification);
  }

  private callListener(
    callback: (notification: WorkNotification) => void,
    notification: WorkNotification,
  ): void {
    try {
      callback(notification);
    } catch (thrown) {
      this.logger.error({ err: coerceError(thrown) }, "work listener callback threw");
    }
  }
}
