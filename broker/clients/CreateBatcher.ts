/**
 * Group commit of task creation, the way the Committer stores results. Every
 * SUBMIT (and Broker.submit) queues here; a flush loop hands all that have
 * arrived to one create_tasks statement, so creation is bound by PostgreSQL
 * commits per batch, not per task. While a statement runs the next batch
 * gathers by itself: no timer, no added latency when idle. A request's reply
 * is sent only once its rows are committed (and read back for the view).
 *
 * Outcomes stay those of one request at a time:
 *  - a request refused on its own (unknown template, bad priority, a template
 *    over the edge limit) gets its error; the rest of its batch is created;
 *  - idempotency keys: the statement skips a key already taken, in the
 *    database or by an earlier request of the same statement, and that
 *    request gets the first one's task with created false;
 *  - PostgreSQL refusing the data itself (SQLSTATE class 22 or 54, see
 *    isDataError): the statement is run again in halves down to the request
 *    at fault, which alone gets invalid_request; its neighbours are created;
 *  - any other failure (the database is unreachable): every request of that
 *    statement gets the error once. Nothing is retried here: nothing was
 *    created, and a client that retries with its idempotency key is safe.
 *
 * A statement holds at most CREATE_BATCH_TASKS tasks and CREATE_BATCH_ROWS
 * rows (tasks, steps and edges), so a large template cannot make a giant
 * statement; a single task over the row bound goes alone. Each statement
 * takes the oldest waiting request and then every later one that fits, so a
 * large task holds up the small ones behind it for one statement at most.
 *
 * Two statements may be in flight (CREATE_IN_FLIGHT), each on its own pooled
 * connection: a SUBMIT that arrives while one runs goes out at once in the
 * second rather than waiting for the first to commit. A request whose
 * idempotency key is held by a statement in flight, or by an earlier request
 * still waiting, waits until that one has gone: two statements racing for
 * one key on two connections could let the later request's win, and the
 * first must. Templates are looked up for one group of requests at a time,
 * so requests wait in arrival order. Both statements insert new rows only
 * (fresh task ids; a key is the only thing two could share), so they do not
 * wait on each other otherwise.
 *
 * Back-pressure is the replies: a client's SUBMIT is answered only once its
 * task is committed, so a client with a window of outstanding SUBMITs goes
 * as fast as PostgreSQL commits, and at most CREATE_IN_FLIGHT create
 * statements per broker are in flight however many clients send. Past CREATE_QUEUE_BOUND waiting
 * requests the broker says so in its log (a few lines per interval); the
 * protocol has no "busy" answer to refuse them with.
 */
import { coerceError, type TaskView } from "../../protocol";
import type { LogLimiter } from "../LogLimiter";
import type { CreateTaskRequest, PreparedCreate, PreparedTask, StatePort } from "../StatePort";
import { pgErrorCode, reasonOf } from "../db/errors";
import { isolateDataErrors } from "../db/isolateDataErrors";
import { StateError } from "../state/errors";

/** Tasks in one create statement at most: a batch this size is a few milliseconds of PostgreSQL work. */
export const CREATE_BATCH_TASKS = 512;
/** Rows (tasks + steps + edges) in one create statement at most; a template at the edge limit has about 11,000. */
export const CREATE_BATCH_ROWS = 16_384;
/**
 * Create statements in flight at most. One more than one lets a request skip
 * the wait for a statement already running; more would only split the same
 * requests into smaller statements and take connections other work needs.
 */
export const CREATE_IN_FLIGHT = 2;
/** Requests waiting for a statement past which the log says the database is behind: four full statements. */
export const CREATE_QUEUE_BOUND = CREATE_BATCH_TASKS * 4;

export interface CreateOutcome {
  task: TaskView;
  created: boolean;
}

interface PendingCreate {
  request: CreateTaskRequest;
  resolve: (outcome: CreateOutcome) => void;
  reject: (err: Error) => void;
}

interface Ready {
  item: PendingCreate;
  prepared: PreparedTask;
}

export type CreateState = Pick<StatePort, "prepareCreates" | "insertCreates" | "getTasks">;

export class CreateBatcher {
  /** Requests whose templates are still to be looked up, oldest first. */
  private queue: PendingCreate[] = [];
  /** Requests whose template was found, oldest first, that no statement has taken yet. */
  private ready: Ready[] = [];
  /** The template lookup running, if any: one at a time, so `ready` stays in arrival order. */
  private preparing: Promise<void> | undefined;
  /** Flush loops running, each with at most one statement in flight. */
  private running = 0;
  /** Idempotency keys of the requests in the statements in flight, with how many hold each. */
  private readonly keysInFlight = new Map<string, number>();
  /** Views being read after a commit: idle() waits for them too, since their replies are still to come. */
  private readonly reading = new Set<Promise<void>>();
  private idleWaiters: (() => void)[] = [];

  constructor(
    private readonly state: CreateState,
    /** Lines that a flood of requests would repeat go through it, a few per interval with a count. */
    private readonly limiter: LogLimiter,
  ) {}

  /** Creates the task of `request` in the next statement; resolves once it is committed. */
  create(request: CreateTaskRequest): Promise<CreateOutcome> {
    return new Promise((resolve, reject) => {
      if (this.queue.length >= CREATE_QUEUE_BOUND) {
        this.limiter.write(
          "create:behind",
          "about SUBMITs waiting for the database",
          "warn",
          { queued: this.queue.length, bound: CREATE_QUEUE_BOUND },
          `${this.queue.length} SUBMITs wait for PostgreSQL, over ${CREATE_QUEUE_BOUND}: each is answered once its task is committed; if this lasts, the database is too slow for the submit rate`,
        );
      }
      this.queue.push({ request, resolve, reject });
      if (this.running < CREATE_IN_FLIGHT) void this.flushLoop();
    });
  }

  /** Resolves when every queued request has been answered. */
  idle(): Promise<void> {
    if (this.isIdle()) return Promise.resolve();
    return new Promise((r) => this.idleWaiters.push(r));
  }

  private isIdle(): boolean {
    return (
      this.running === 0 && this.queue.length === 0 && this.ready.length === 0 && this.reading.size === 0
    );
  }

  private wakeIfIdle(): void {
    if (!this.isIdle()) return;
    const w = this.idleWaiters;
    this.idleWaiters = [];
    for (const f of w) f();
  }

  private async flushLoop(): Promise<void> {
    this.running++;
    try {
      for (;;) {
        await this.prepareWaiting();
        // Empty while requests still wait: their keys are held by the other loop's statement,
        // and that loop takes them once it is over.
        const part = this.take();
        if (part.length === 0) break;
        try {
          await this.insertIsolating(part);
        } catch (e) {
          // insertIsolating answers every request itself; this is a bug's last line of defence
          const err = coerceError(e);
          for (const r of part) r.item.reject(err);
        } finally {
          this.release(part);
        }
      }
    } finally {
      this.running--;
      this.wakeIfIdle();
    }
  }

  /** Looks up the templates of what arrived meanwhile, up to a statement's worth waiting, one group at a time. */
  private async prepareWaiting(): Promise<void> {
    while (this.queue.length > 0 && this.ready.length < CREATE_BATCH_TASKS) {
      if (this.preparing === undefined) {
        const items = this.queue.splice(0, CREATE_BATCH_TASKS - this.ready.length);
        this.preparing = this.prepare(items).finally(() => (this.preparing = undefined));
      }
      await this.preparing;
    }
    if (this.preparing !== undefined) await this.preparing;
  }

  /** Finds the templates of `items`: a request refused on its own is answered now, the others wait in `ready`. */
  private async prepare(items: PendingCreate[]): Promise<void> {
    let prepared: PreparedCreate[];
    try {
      prepared = await this.state.prepareCreates(items.map((i) => i.request));
    } catch (e) {
      const err = coerceError(e);
      for (const item of items) item.reject(err);
      return;
    }
    items.forEach((item, i) => {
      const p = prepared[i]!;
      if ("error" in p) item.reject(p.error);
      else this.ready.push({ item, prepared: p });
    });
  }

  /**
   * The next statement: the oldest waiting request that may go, and every
   * later one that still fits beside it, in arrival order. A task of a
   * template at the edge limit fills most of a statement: taken in strict
   * order, the small SUBMITs behind ten of them would wait for ten
   * statements; this way they wait for at most the one being written when
   * they arrived. A request may go unless its idempotency key is held by a
   * statement in flight or by an earlier request left waiting. Their keys are
   * held until `release`.
   */
  private take(): Ready[] {
    const part: Ready[] = [];
    const rest: Ready[] = [];
    const passed = new Set<string>();
    let rows = 0;
    for (const r of this.ready) {
      const key = r.item.request.idempotencyKey;
      const free = key === undefined || (!this.keysInFlight.has(key) && !passed.has(key));
      const fits =
        part.length === 0 ||
        (part.length < CREATE_BATCH_TASKS && rows + r.prepared.rows <= CREATE_BATCH_ROWS);
      if (free && fits) {
        part.push(r);
        rows += r.prepared.rows;
      } else {
        rest.push(r);
        if (key !== undefined) passed.add(key);
      }
    }
    this.ready = rest;
    this.hold(part);
    return part;
  }

  private hold(items: Ready[]): void {
    for (const {
      item: { request },
    } of items) {
      const key = request.idempotencyKey;
      if (key !== undefined) this.keysInFlight.set(key, (this.keysInFlight.get(key) ?? 0) + 1);
    }
  }

  private release(items: Ready[]): void {
    for (const {
      item: { request },
    } of items) {
      const key = request.idempotencyKey;
      if (key === undefined) continue;
      const n = this.keysInFlight.get(key)! - 1;
      if (n === 0) this.keysInFlight.delete(key);
      else this.keysInFlight.set(key, n);
    }
  }

  /**
   * One statement for `ready`; when PostgreSQL refuses its data, halves of it,
   * down to the request at fault. Every request is answered (or its view read) here.
   */
  private async insertIsolating(ready: Ready[]): Promise<void> {
    // Answered once the isolation is over, so that a fault in answering is not taken for the database's.
    const created: [Ready[], { id: string; created: boolean }[]][] = [];
    let rest = ready;
    while (rest.length > 0) {
      const stop = await isolateDataErrors(rest, {
        run: async (part) => {
          created.push([part, await this.state.insertCreates(part.map((r) => r.prepared))]);
        },
        halving: (part, err) =>
          this.limiter.write(
            `create:halves:${pgErrorCode(err)}`,
            "about batches of new tasks PostgreSQL refused",
            "warn",
            { err, tasks: part.length },
            `PostgreSQL refused a batch of ${part.length} new tasks (${reasonOf(err)}); creating it in halves to find the request at fault`,
          ),
        single: async (r, err) => {
          const req = r.prepared.request;
          this.limiter.write(
            `create:refused:${pgErrorCode(err)}`,
            "about new tasks PostgreSQL refused",
            "warn",
            { err, template: `${req.namespace}/${req.name}`, idempotency_key: req.idempotencyKey },
            `PostgreSQL refused to store a new task of ${req.namespace}/${req.name}: ${reasonOf(err)}; only that request was refused`,
          );
          r.item.reject(
            new StateError(
              "invalid_request",
              `PostgreSQL refused to store this task (${reasonOf(err)}): remove the value it cannot store (U+0000, an unpaired surrogate) from the context and submit again`,
              { cause: err },
            ),
          );
          return undefined;
        },
      });
      if (stop === undefined) break;
      // Nothing was created by the failed statement; its requests get the error, the others are still tried.
      for (const r of stop.part) r.item.reject(stop.err);
      rest = stop.rest;
    }
    for (const [part, ids] of created) this.answer(part, ids);
  }

  /** Reads the new tasks' views (one read for the statement) and replies; the next statement need not wait for it. */
  private answer(part: Ready[], ids: { id: string; created: boolean }[]): void {
    const done = this.state.getTasks(ids.map((x) => x.id)).then(
      (views) => {
        part.forEach((r, i) => {
          const { id, created } = ids[i]!;
          const task = views.get(id);
          if (task === undefined) r.item.reject(new Error(`task ${id} vanished right after it was created`));
          else r.item.resolve({ task, created });
        });
      },
      (e: unknown) => {
        for (const r of part) r.item.reject(coerceError(e));
      },
    );
    this.reading.add(done);
    void done.finally(() => {
      this.reading.delete(done);
      this.wakeIfIdle();
    });
  }
}
