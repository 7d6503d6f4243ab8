/**
 * Reads for operators' eyes: the dashboard's task list, a task's transitions,
 * queue depth and recent throughput, and a readiness ping. All read-only, each
 * one statement that stays on an index (see each query's comment), so a page
 * left open on a busy broker costs the hot path little.
 */
import type { StepState, TaskState } from "../../protocol/constants";
import type { StateSql } from "./StateSql";
import { isUuid, iso, type TaskRow } from "./rows";
import type { JsonValue, TaskError } from "./types";

export interface TaskListFilter {
  state?: TaskState;
  /** "namespace/name" or "name". */
  template?: string;
  /** A case-insensitive substring of the task id, idempotency key or context. */
  text?: string;
  /** Only tasks older than this task id (the previous page's `next`). */
  before?: string;
  /** Page size, 1..500. */
  limit?: number;
}

export interface TaskListItem {
  task_id: string;
  template: { namespace: string; name: string; version: string };
  state: TaskState;
  priority: number;
  idempotency_key: string | null;
  error: TaskError | null;
  created_at: string;
  finished_at: string | null;
  steps_total: number;
  steps_done: number;
}

export interface TaskListPage {
  tasks: TaskListItem[];
  /** Pass as `before` for the next page; null on the last page. */
  next: string | null;
}

export interface TransitionRecord {
  /** Null for the task's own transitions. */
  stepId: string | null;
  stepName: string | null;
  from: string | null;
  to: StepState | TaskState;
  event: string;
  attemptId: string | null;
  metadata: JsonValue | null;
  at: string;
}

export interface QueueDepthRow {
  handler: string;
  ready: number;
  oldestAgeSeconds: number;
}

export interface ThroughputRow {
  /** The minute's start, ISO 8601. */
  minute: string;
  outcome: string;
  count: number;
}

/** How far before the window attempts may have started and still be counted (their ids are time-ordered). */
const THROUGHPUT_START_SLACK_MS = 15 * 60_000;
export const MAX_PAGE = 500;

export class DashboardReads {
  constructor(private readonly sql: StateSql) {}

  async listTasks(filter: TaskListFilter = {}): Promise<TaskListPage> {
    const limit = Math.min(MAX_PAGE, Math.max(1, Math.floor(filter.limit ?? 50)));
    const before = filter.before !== undefined && isUuid(filter.before) ? filter.before : null;
    const rows = await this.sql.run<Omit<TaskRow, "context"> & { steps_total: number; steps_done: number }>(
      "list_tasks",
      [filter.state ?? null, filter.template || null, filter.text || null, before, limit + 1],
    );
    const page = rows.slice(0, limit);
    return {
      tasks: page.map((r) => ({
        task_id: r.id,
        template: { namespace: r.namespace, name: r.name, version: r.version },
        state: r.state,
        priority: r.priority,
        idempotency_key: r.idempotency_key,
        error: r.error,
        created_at: iso(r.created_at),
        finished_at: r.finished_at === null ? null : iso(r.finished_at),
        steps_total: r.steps_total,
        steps_done: r.steps_done,
      })),
      next: rows.length > limit ? page[page.length - 1]!.id : null,
    };
  }

  /** Every transition of the task and of its steps, oldest first. */
  async transitions(taskId: string): Promise<TransitionRecord[]> {
    if (!isUuid(taskId)) return [];
    const rows = await this.sql.run<{
      step_id: string | null;
      step_name: string | null;
      from_state: string | null;
      to_state: StepState | TaskState;
      event: string;
      attempt_id: string | null;
      metadata: JsonValue | null;
      created_at: Date;
    }>("get_transitions", [taskId]);
    return rows.map((r) => ({
      stepId: r.step_id,
      stepName: r.step_name,
      from: r.from_state,
      to: r.to_state,
      event: r.event,
      attemptId: r.attempt_id,
      metadata: r.metadata,
      at: iso(r.created_at),
    }));
  }

  /** Ready steps per handler, with how long the oldest has been runnable. */
  async queueDepth(): Promise<QueueDepthRow[]> {
    const rows = await this.sql.run<{ handler: string; ready: number; oldest_age_seconds: number }>(
      "queue_depth",
      [],
    );
    return rows.map((r) => ({ handler: r.handler, ready: r.ready, oldestAgeSeconds: r.oldest_age_seconds }));
  }

  /**
   * Attempts finished per minute over the last `minutes` (1..120), by
   * outcome. An attempt that ran longer than 15 minutes before the window is
   * not counted: the bound keeps the scan on recent ids.
   */
  async throughput(minutes: number): Promise<ThroughputRow[]> {
    const m = Math.min(120, Math.max(1, Math.floor(minutes)));
    const lowest = smallestIdAt(Date.now() - (m + 1) * 60_000 - THROUGHPUT_START_SLACK_MS);
    const rows = await this.sql.run<{ minute: Date; outcome: string; n: number }>("throughput", [lowest, m]);
    return rows.map((r) => ({ minute: iso(r.minute), outcome: r.outcome, count: r.n }));
  }

  /** Resolves when the database answers `select 1` within `timeoutMs`; rejects otherwise. */
  async ping(timeoutMs: number): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new Error(`the database did not answer select 1 within ${timeoutMs} ms`)),
        timeoutMs,
      );
    });
    try {
      await Promise.race([this.sql.db.pool.query("select 1"), timeout]);
    } finally {
      clearTimeout(timer);
    }
  }
}

/** The smallest version-7 UUID of millisecond `ms`: every id made at or after `ms` sorts after it. */
function smallestIdAt(ms: number): string {
  const h = Math.max(0, Math.floor(ms)).toString(16).padStart(12, "0");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-7000-8000-000000000000`;
}
