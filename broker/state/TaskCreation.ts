/**
 * Task creation: a task, its steps, its edges and their first transitions in
 * one statement per batch; idempotency keys map a repeated request to the
 * task it created.
 */
import { TRACEPARENT } from "../../protocol/traceContext";
import { uuidv7 } from "../db/uuidv7";
import { StateError } from "./errors";
import type { StateSql } from "./StateSql";
import { MAX_TEMPLATE_EDGES, templateEdges } from "./templates";
import type { TaskReads } from "./TaskReads";
import type { TemplateStore } from "./TemplateStore";
import type { WorkNotifier } from "./WorkNotifier";
import { INT4_MAX, isJsonObject } from "./rows";
import type { CreateTaskRequest, PreparedCreate, PreparedTask, TaskView, TemplateRecord } from "./types";

export class TaskCreation {
  constructor(
    private readonly sql: StateSql,
    private readonly templates: TemplateStore,
    private readonly notifier: WorkNotifier,
    private readonly reads: TaskReads,
  ) {}

  /** Each template's edges as step positions, computed once (a registered version never changes). */
  private readonly edges = new Map<number, { child: number[]; parent: number[] }>();

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
    // SUBMIT's schema checks these too; this is for callers of the API (CLI, HTTP, tests)
    if (req.traceparent !== undefined && !TRACEPARENT.test(req.traceparent)) {
      throw new StateError(
        "invalid_request",
        `traceparent ${JSON.stringify(req.traceparent)} is not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>, lowercase, ids not all zero)`,
      );
    }
    if (req.tracestate !== undefined && (req.tracestate.length > 512 || !/^[ -~]*$/.test(req.tracestate))) {
      throw new StateError("invalid_request", "a tracestate has at most 512 printable ASCII characters");
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
    const task = await this.reads.getTask(inserted.id, { includeSteps: true });
    if (task === null) throw new Error(`task ${inserted.id} vanished right after it was created`);
    return { task, created: inserted.created };
  }

  /** A template's edges as step positions, computed once per template; refused when over the edge limit. */
  private edgesOf(t: TemplateRecord): { child: number[]; parent: number[] } {
    let e = this.edges.get(t.id);
    if (e === undefined) this.edges.set(t.id, (e = templateEdges(t.definition)));
    // a template registered before the edge limit existed is refused here too
    if (e.child.length > MAX_TEMPLATE_EDGES) {
      throw new StateError(
        "invalid_request",
        `template ${t.namespace}/${t.name}@${t.version} has ${e.child.length} dependency edges; the limit is ${MAX_TEMPLATE_EDGES}: register a version with fewer depends_on entries`,
      );
    }
    return e;
  }

  /**
   * The dependency edges of each distinct template of a batch, as step
   * positions (create_tasks.sql turns them into step ids by subscript).
   */
  private batchEdges(templates: TemplateRecord[]): {
    templateIds: number[];
    child: number[];
    parent: number[];
  } {
    const out = { templateIds: [] as number[], child: [] as number[], parent: [] as number[] };
    for (const t of new Map(templates.map((t) => [t.id, t])).values()) {
      const e = this.edgesOf(t);
      for (let i = 0; i < e.child.length; i++) {
        out.templateIds.push(t.id);
        out.child.push(e.child[i]!);
        out.parent.push(e.parent[i]!);
      }
    }
    return out;
  }

  /**
   * Checks each request and finds its template, each on its own: one
   * request's unknown template or bad priority is that request's outcome, not
   * its neighbours'. "Latest" is looked up once per call, so every request of
   * a batch naming no version gets the same one.
   */
  async prepareCreates(requests: CreateTaskRequest[]): Promise<PreparedCreate[]> {
    const latest = new Map<string, Promise<TemplateRecord>>();
    return Promise.all(
      requests.map(async (request): Promise<PreparedCreate> => {
        try {
          this.checkRequest(request);
          let template: Promise<TemplateRecord>;
          if (request.version !== undefined) {
            template = this.templates.get(request.namespace, request.name, request.version);
          } else {
            const key = `${request.namespace}\0${request.name}`;
            let found = latest.get(key);
            if (found === undefined)
              latest.set(key, (found = this.templates.get(request.namespace, request.name)));
            template = found;
          }
          const t = await template;
          const rows = 1 + t.definition.steps.length + this.edgesOf(t).child.length;
          return { request, template: t, rows };
        } catch (e) {
          return { request, error: e instanceof Error ? e : new Error(String(e)) };
        }
      }),
    );
  }

  /**
   * One create_tasks statement for requests prepareCreates accepted; their
   * outcomes in order. Throws when the statement fails: then none of them was created.
   */
  insertCreates(prepared: PreparedTask[]): Promise<{ id: string; created: boolean }[]> {
    return this.insertResolved(
      prepared.map((p) => p.request),
      prepared.map((p) => p.template),
    );
  }

  private async insertTasks(requests: CreateTaskRequest[]): Promise<{ id: string; created: boolean }[]> {
    if (requests.length === 0) return [];
    // the first refusal in request order fails the whole call, as this array API always did
    for (const req of requests) this.checkRequest(req);
    const prepared = await this.prepareCreates(requests);
    const templates = prepared.map((p) => {
      if ("error" in p) throw p.error;
      return p.template;
    });
    return this.insertResolved(requests, templates);
  }

  private async insertResolved(
    requests: CreateTaskRequest[],
    templates: TemplateRecord[],
  ): Promise<{ id: string; created: boolean }[]> {
    if (requests.length === 0) return [];
    const edges = this.batchEdges(templates);
    const ids = requests.map(() => uuidv7());
    const rows = await this.sql.run<{ id: string }>("create_tasks", [
      ids,
      templates.map((t) => t.id),
      requests.map((r) => JSON.stringify(r.context)),
      requests.map((r) => r.priority ?? 0),
      requests.map((r) => r.idempotencyKey ?? null),
      this.notifier.workChannel,
      this.notifier.payload("created"),
      edges.templateIds,
      edges.child,
      edges.parent,
      requests.map((r) => r.traceparent ?? null),
      requests.map((r) => r.tracestate ?? null),
    ]);
    if (rows.length > 0) this.notifier.wakeLocal({ reason: "created" });
    const inserted = new Set(rows.map((r) => r.id));
    if (inserted.size === requests.length) return ids.map((id) => ({ id, created: true }));

    // The others were skipped: their idempotency key belongs to an existing task
    // (or to an earlier request of this batch).
    const keys = requests.flatMap((r, i) =>
      inserted.has(ids[i] ?? "") || r.idempotencyKey === undefined ? [] : [r.idempotencyKey],
    );
    const existing = await this.sql.run<{ id: string; idempotency_key: string }>(
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
}
