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
import type { TaskState } from "../../protocol/constants";
import type { Logger } from "../db/logger";
import { migrateSchema } from "../db/migrate";
import { type Database, type OpenDatabaseOptions, openDatabase } from "../db/openDatabase";
import { Attempts } from "./Attempts";
import { BrokerRegistry } from "./BrokerRegistry";
import { EventNotifier } from "./EventNotifier";
import {
  DashboardReads,
  type QueueDepthRow,
  type TaskListFilter,
  type TaskListPage,
  type ThroughputRow,
  type TransitionRecord,
} from "./DashboardReads";
import type { TaskHistory } from "./TaskHistory";
import {
  type CreatedPartition,
  type HistoryPartition,
  HistoryPartitions,
  type PruneResult,
} from "./HistoryPartitions";
import { OperatorActions } from "./OperatorActions";
import { Requeues } from "./Requeues";
import { StateSql } from "./StateSql";
import { TaskCreation } from "./TaskCreation";
import { TaskReads } from "./TaskReads";
import { TemplateStore } from "./TemplateStore";
import { WorkNotifier } from "./WorkNotifier";
import { listenToAll } from "./workListener";
import type {
  AdoptedAttempt,
  PoolSessionOutcome,
  AttemptRecord,
  AttemptResult,
  BrokerEvent,
  BrokerRecord,
  BrokerRegistration,
  ChildClaim,
  ClaimRequest,
  ClaimedStep,
  CompletionResult,
  CreateTaskRequest,
  ExpiredAttempt,
  PreparedCreate,
  PreparedTask,
  ExplainRow,
  FinishedTask,
  JsonValue,
  ReadiedStep,
  ReclaimedAttempt,
  RequeueResult,
  TaskView,
  TemplateDefinition,
  TemplateRecord,
  WorkNotification,
} from "./types";

export interface StateManagerOptions {
  logger?: Logger;
}

/**
 * The one facade the broker, the CLI and the tests use; each part lives in a
 * file of its own (see the imports) and shares one StateSql.
 */
export class StateManager {
  readonly db: Database;
  /** NOTIFY channel for work created by any process (per schema; at most 63 characters). */
  readonly workChannel: string;
  /** NOTIFY channel for broker events (cancels, finished tasks) of any process (per schema; at most 63 characters). */
  readonly eventsChannel: string;
  private readonly sql: StateSql;
  private readonly notifier: WorkNotifier;
  private readonly events: EventNotifier;
  private readonly brokers: BrokerRegistry;
  private readonly templates: TemplateStore;
  private readonly reads: TaskReads;
  private readonly creation: TaskCreation;
  private readonly attempts: Attempts;
  private readonly requeues: Requeues;
  private readonly operator: OperatorActions;
  private readonly dashboard: DashboardReads;
  private readonly partitions: HistoryPartitions;

  constructor(db: Database, options: StateManagerOptions = {}) {
    this.db = db;
    this.sql = new StateSql(db, options.logger ?? db.logger);
    this.notifier = new WorkNotifier(this.sql);
    this.workChannel = this.notifier.workChannel;
    this.events = new EventNotifier(this.sql);
    this.eventsChannel = this.events.eventsChannel;
    this.templates = new TemplateStore(this.sql);
    this.reads = new TaskReads(this.sql);
    this.creation = new TaskCreation(this.sql, this.templates, this.notifier, this.reads);
    this.attempts = new Attempts(this.sql);
    this.requeues = new Requeues(this.sql, this.events);
    this.operator = new OperatorActions(this.sql, this.notifier, this.events);
    this.brokers = new BrokerRegistry(this.sql, this.requeues, this.events);
    this.dashboard = new DashboardReads(this.sql);
    this.partitions = new HistoryPartitions(this.sql);
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

  /** Applies pending migrations; returns the names of those applied now. */
  async migrate(): Promise<string[]> {
    const client = await this.db.pool.connect();
    try {
      return await migrateSchema(client, this.db.schema, this.sql.logger);
    } finally {
      client.release();
    }
  }

  // ---------------------------------------------------------------- templates (TemplateStore)

  /**
   * Validates and registers a template. Registering the same definition again
   * returns the existing record; a different definition under a registered
   * namespace/name/version is refused (TemplateError template_conflict).
   */
  registerTemplate(definition: unknown): Promise<TemplateRecord> {
    return this.templates.register(definition);
  }

  /** A registered template; without a version, the one registered last. */
  getTemplate(namespace: string, name: string, version?: string): Promise<TemplateRecord> {
    return this.templates.get(namespace, name, version);
  }

  /** Every registered template, as registered (defaults filled in). */
  listTemplates(): Promise<TemplateDefinition[]> {
    return this.templates.list();
  }

  // ---------------------------------------------------------------- tasks (TaskCreation)

  /**
   * Inserts tasks with all their steps in one statement; returns the task id
   * of each request, in order (the existing task's id for a known idempotency key).
   */
  createTasks(requests: CreateTaskRequest[]): Promise<string[]> {
    return this.creation.createTasks(requests);
  }

  /**
   * Creates one task from a registered template (the latest version when none
   * is given). A known idempotency key returns the existing task, created=false.
   */
  createTask(request: CreateTaskRequest): Promise<{ task: TaskView; created: boolean }> {
    return this.creation.createTask(request);
  }

  /** Checks create requests and finds their templates, each on its own (see TaskCreation.prepareCreates). */
  prepareCreates(requests: CreateTaskRequest[]): Promise<PreparedCreate[]> {
    return this.creation.prepareCreates(requests);
  }

  /** One create statement for prepared requests; each one's task id and whether it was created. */
  insertCreates(prepared: PreparedTask[]): Promise<{ id: string; created: boolean }[]> {
    return this.creation.insertCreates(prepared);
  }

  // ---------------------------------------------------------------- attempts (Attempts)

  /** Claims ready steps for the given handlers under a lease each (see Attempts.claimSteps). */
  claimSteps(request: ClaimRequest): Promise<ClaimedStep[]> {
    return this.attempts.claimSteps(request);
  }

  /** Stores a batch of results in one transaction (see Attempts.completeAttempts). */
  async completeAttempts(results: AttemptResult[], claim?: ChildClaim): Promise<CompletionResult> {
    const result = await this.attempts.completeAttempts(results, claim);
    // finalize_tasks() NOTIFYed other processes in the same statement; ours hear it now.
    this.events.wakeFinished(result.finishedTasks);
    return result;
  }

  /** Extends the leases of attempts that still hold one (and, with `poolId`, were sent to it); returns those that do not. */
  extendLeases(attemptIds: string[], poolId?: string): Promise<string[]> {
    return this.attempts.extendLeases(attemptIds, poolId);
  }

  /** Renews, under this broker, the attempts a reconnecting pool still holds (see Attempts.adoptAttempts). */
  adoptAttempts(attemptIds: string[], brokerId: string, poolId?: string): Promise<AdoptedAttempt[]> {
    return this.attempts.adoptAttempts(attemptIds, brokerId, poolId);
  }

  /** The attempts among these that were sent to another pool than `poolId` (see Attempts.foreignAttempts). */
  foreignAttempts(attemptIds: string[], poolId: string): Promise<Map<string, string>> {
    return this.attempts.foreignAttempts(attemptIds, poolId);
  }

  /** Judges and records a HELLO's pool session (see Attempts.takePoolSession). */
  takePoolSession(poolId: string, sessionHash: string | null): Promise<PoolSessionOutcome> {
    return this.attempts.takePoolSession(poolId, sessionHash);
  }

  // ---------------------------------------------------------------- requeues (Requeues)

  /**
   * The lease reaper (see Requeues.expireLeases). A broker sharing the
   * database calls it with `self` and no brokerId: every broker's expired
   * leases, the others' announced to them as cancel events.
   */
  expireLeases(
    options: { brokerId?: string; limit?: number; self?: string } = {},
  ): Promise<ExpiredAttempt[]> {
    return this.requeues.expireLeases(options);
  }

  /** Puts in-flight steps back to ready at once (see Requeues.releaseAttempts). */
  releaseAttempts(
    attemptIds: string[],
    options: { countAttempt: boolean; reason: string },
  ): Promise<RequeueResult> {
    return this.requeues.releaseAttempts(attemptIds, options);
  }

  /** After a broker start: attempts its previous life left in flight (see Requeues.recoverOrphans). */
  recoverOrphans(options: { brokerId: string; olderThan?: Date; keep?: string[] }): Promise<RequeueResult> {
    return this.requeues.recoverOrphans(options);
  }

  // ---------------------------------------------------------------- brokers (BrokerRegistry)

  /** At start: upserts this broker's row (see BrokerRegistry.registerBroker). */
  registerBroker(registration: BrokerRegistration): Promise<{ startedAt: string }> {
    return this.brokers.registerBroker(registration);
  }

  /** Every BROKER_HEARTBEAT_INTERVAL_MS; false: register again (see BrokerRegistry.heartbeatBroker). */
  heartbeatBroker(brokerId: string): Promise<boolean> {
    return this.brokers.heartbeatBroker(brokerId);
  }

  /** At a clean stop, after the drain (see BrokerRegistry.markBrokerStopped). */
  markBrokerStopped(brokerId: string): Promise<boolean> {
    return this.brokers.markBrokerStopped(brokerId);
  }

  /** Every broker row with its liveness and in-flight count (see BrokerRegistry.listBrokers). */
  listBrokers(options: { deadAfterMs?: number } = {}): Promise<BrokerRecord[]> {
    return this.brokers.listBrokers(options);
  }

  /** Every BROKER_RECLAIM_INTERVAL_MS: dead brokers' in-flight attempts back to ready, once (see BrokerRegistry.reclaimDeadBrokers). */
  reclaimDeadBrokers(options: {
    self: string;
    deadAfterMs?: number;
    limit?: number;
  }): Promise<ReclaimedAttempt[]> {
    return this.brokers.reclaimDeadBrokers(options);
  }

  // ---------------------------------------------------------------- history partitions (HistoryPartitions)

  /** Creates the history tables' day partitions through `daysAhead` days ahead (see HistoryPartitions.ensure). */
  ensureHistoryPartitions(daysAhead: number): Promise<CreatedPartition[]> {
    return this.partitions.ensure(daysAhead);
  }

  /** Every partition of the history tables with its range and row estimate. */
  listHistoryPartitions(): Promise<HistoryPartition[]> {
    return this.partitions.list();
  }

  /** Retention: deletes tasks finished before `before`, then drops the history partitions no present task needs (see HistoryPartitions.prune). */
  pruneHistory(before: Date, options: { batch?: number } = {}): Promise<PruneResult> {
    return this.partitions.prune(before, options);
  }

  // ---------------------------------------------------------------- operators (OperatorActions)

  /** Cancels a task (see OperatorActions.cancelTask). */
  cancelTask(taskId: string): Promise<{ cancelledAttempts: string[]; state: TaskState }> {
    return this.operator.cancelTask(taskId);
  }

  /** An operator's retry of a step or of a task's failed steps (see OperatorActions.retry). */
  retry(
    target: { taskId: string } | { stepId: string },
  ): Promise<{ retried: string[]; readied: ReadiedStep[] }> {
    return this.operator.retry(target);
  }

  /** An operator resolves a step by hand (see OperatorActions.resolveStep). */
  resolveStep(
    stepId: string,
    output?: JsonValue,
  ): Promise<{ readied: ReadiedStep[]; finishedTasks: FinishedTask[] }> {
    return this.operator.resolveStep(stepId, output);
  }

  // ---------------------------------------------------------------- reads (TaskReads)

  /** The task as protocol task_view (with its steps when asked), or null. */
  getTask(taskId: string, options: { includeSteps?: boolean } = {}): Promise<TaskView | null> {
    return this.reads.getTask(taskId, options);
  }

  /** Many tasks as task_views with their steps, in two round trips (see TaskReads.getTasks). */
  getTasks(taskIds: readonly string[]): Promise<Map<string, TaskView>> {
    return this.reads.getTasks(taskIds);
  }

  /** Every attempt of a step, or of all steps of a task, oldest first. */
  getAttempts(stepOrTaskId: string): Promise<AttemptRecord[]> {
    return this.reads.getAttempts(stepOrTaskId);
  }

  /** Per step, every readiness condition and the first that blocks it (see TaskReads.explain). */
  explain(taskId: string, options: { servedHandlers?: ReadonlySet<string> } = {}): Promise<ExplainRow[]> {
    return this.reads.explain(taskId, options);
  }

  // ---------------------------------------------------------------- operators' reads (DashboardReads)

  /** Tasks newest first, filtered and paged (see DashboardReads.listTasks). */
  listTasks(filter: TaskListFilter = {}): Promise<TaskListPage> {
    return this.dashboard.listTasks(filter);
  }

  /** Every transition of a task and of its steps, oldest first. */
  getTransitions(taskId: string): Promise<TransitionRecord[]> {
    return this.dashboard.transitions(taskId);
  }

  /** A task with every transition and attempt (for `stepbroker history`), or null. */
  async getHistory(taskId: string): Promise<TaskHistory | null> {
    const task = await this.reads.getTask(taskId, { includeSteps: true });
    if (task === null) return null;
    const [transitions, attempts] = await Promise.all([
      this.dashboard.transitions(taskId),
      this.reads.getAttempts(taskId),
    ]);
    return { task, transitions, attempts };
  }

  /** Ready steps per handler, with the oldest one's age. */
  queueDepth(): Promise<QueueDepthRow[]> {
    return this.dashboard.queueDepth();
  }

  /** Attempts finished per minute over the last minutes, by outcome (see DashboardReads.throughput). */
  throughput(minutes: number): Promise<ThroughputRow[]> {
    return this.dashboard.throughput(minutes);
  }

  /** Resolves when the database answers within `timeoutMs` (for readiness probes). */
  ping(timeoutMs: number): Promise<void> {
    return this.dashboard.ping(timeoutMs);
  }

  // ---------------------------------------------------------------- notifications (WorkNotifier)

  /** Calls `callback` whenever any process makes work (see WorkNotifier.listenForWork). */
  listenForWork(callback: (notification: WorkNotification) => void): Promise<() => Promise<void>> {
    return this.notifier.listenForWork(callback);
  }

  /** Calls `callback` with every cancel and finished-task event of any broker on the database (see EventNotifier.listenForEvents). */
  listenForEvents(callback: (event: BrokerEvent) => void): Promise<() => Promise<void>> {
    return this.events.listenForEvents(callback);
  }

  /**
   * listenForWork and listenForEvents on ONE LISTEN connection: what a broker
   * uses, so each broker holds one connection for notifications, not two.
   */
  listen(handlers: {
    onWork?: (notification: WorkNotification) => void;
    onEvent?: (event: BrokerEvent) => void;
  }): Promise<() => Promise<void>> {
    return listenToAll(
      [
        ...(handlers.onWork ? [this.notifier.subscription(handlers.onWork)] : []),
        ...(handlers.onEvent ? [this.events.subscription(handlers.onEvent)] : []),
      ],
      { newClient: () => this.db.newClient(), logger: this.sql.logger },
    );
  }
}
