/**
 * The client verbs: SUBMIT, STATUS, WAIT, CANCEL_TASK, POOLS and HISTORY, each
 * answered by one REPLY (or an ERROR) carrying the request's request_id, in
 * the encoding the request came in. The in-process API (`Broker.submit`, …)
 * runs the same code.
 */
import {
  BrokerCommands,
  CancelReasons,
  coerceError,
  encodeMessage,
  fault,
  faultToErrorBody,
  type BodyOf,
  type Encoding,
  type ErrorCode,
  type Message,
  type PoolView,
  type TaskView,
} from "../../protocol";
import type { BrokerContext } from "../BrokerContext";
import type { PoolRecord } from "../pools/PoolRegistry";
import type { Role } from "../roles";
import { Roles } from "../roles";
import type { CreateTaskRequest } from "../StatePort";
import type { JsonObject } from "../state/types";
import { CreateBatcher } from "./CreateBatcher";
import { historyView } from "./historyView";
import type { Waiters } from "./Waiters";

export interface SubmitResult {
  task: TaskView;
  created: boolean;
}

export class ClientVerbs {
  /** SUBMITs that arrive together are created in one statement (group commit). */
  private readonly creates: CreateBatcher;

  constructor(
    private readonly ctx: BrokerContext,
    private readonly waiters: Waiters,
    private readonly rolesOf: (identity: Buffer) => ReadonlySet<Role>,
  ) {
    this.creates = new CreateBatcher(ctx.state, ctx.limiter);
  }

  /**
   * Creates a task, in one statement with the others that arrive meanwhile;
   * dispatch starts through the work listener, which the state manager calls once it commits.
   */
  submit(req: CreateTaskRequest): Promise<SubmitResult> {
    return this.creates.create(req);
  }

  /** Resolves when every SUBMIT received has been answered. */
  idle(): Promise<void> {
    return this.creates.idle();
  }

  status(taskId: string): Promise<TaskView | null> {
    return this.ctx.state.getTask(taskId, { includeSteps: true });
  }

  /** Cancels the task; its attempts in flight here get CANCEL task_cancelled. */
  async cancel(taskId: string): Promise<TaskView | null> {
    const { ctx } = this;
    if (!(await ctx.state.getTask(taskId))) return null;
    const out = await ctx.state.cancelTask(taskId);
    const byPool = new Map<PoolRecord, string[]>();
    for (const attemptId of out.cancelledAttempts) {
      const held = ctx.pools.takeInFlight(attemptId);
      if (!held) continue;
      const list = byPool.get(held.pool) ?? [];
      list.push(attemptId);
      byPool.set(held.pool, list);
    }
    for (const [pool, ids] of byPool) ctx.sendCancel(pool, ids, CancelReasons.TASK_CANCELLED);
    ctx.log.info(
      { task_id: taskId, cancelled_attempts: out.cancelledAttempts.length },
      `cancelled task ${taskId}`,
    );
    ctx.kick();
    const task = await ctx.state.getTask(taskId, { includeSteps: true });
    if (task) this.waiters.finish(taskId, task);
    return task;
  }

  listPools(): (PoolView & { pool_id: string })[] {
    return this.ctx.pools.view(Date.now());
  }

  async serve(identity: Buffer, msg: Message, enc: Encoding): Promise<void> {
    const { ctx } = this;
    const requestId = (msg.body as { request_id: string }).request_id;
    const refuse = (code: ErrorCode, detail: string): void =>
      ctx.send(
        identity,
        BrokerCommands.ERROR,
        faultToErrorBody(fault(code, detail, { command: msg.command }), { request_id: requestId }),
        enc,
      );
    const reply = (body: Omit<BodyOf<"REPLY">, "request_id">): void => {
      const frames = encodeMessage("REPLY", { request_id: requestId, ...body }, enc);
      const size = frames[2]!.length;
      if (size <= ctx.opts.maxMessageBytes) return ctx.outbox.send(identity, frames);
      // The client's decoder refuses what is over the limit, so the reply would be lost and the client
      // would wait for nothing: say what happened instead, in an answer that fits.
      const task = body.task ? ` (task ${body.task.task_id} is ${body.task.state})` : "";
      ctx.log.warn(
        { task_id: body.task?.task_id, request_id: requestId, command: msg.command, bytes: size },
        `the REPLY to ${msg.command}${task} would be ${size} bytes, over max_message_bytes ${ctx.opts.maxMessageBytes}; sent reply_too_large instead`,
      );
      refuse(
        "reply_too_large",
        `The REPLY to ${msg.command} would be ${size} bytes, over max_message_bytes ${ctx.opts.maxMessageBytes}; the request was carried out${task}`,
      );
    };
    try {
      if (!ctx.isRunning()) return refuse("shutting_down", "The broker is stopping");
      switch (msg.command) {
        case "SUBMIT": {
          const b = msg.body;
          const req: CreateTaskRequest = {
            namespace: b.template.namespace,
            name: b.template.name,
            context: b.context as JsonObject,
          };
          if (b.template.version !== undefined) req.version = b.template.version;
          if (b.idempotency_key !== undefined) req.idempotencyKey = b.idempotency_key;
          if (b.priority !== undefined) req.priority = b.priority;
          // a tracestate means nothing without the traceparent it belongs to (W3C Trace Context)
          if (b.traceparent !== undefined) {
            req.traceparent = b.traceparent;
            if (b.tracestate !== undefined) req.tracestate = b.tracestate;
          }
          const out = await this.submit(req);
          return reply({ task: out.task, created: out.created });
        }
        case "STATUS": {
          const task = await this.status(msg.body.task_id);
          return task ? reply({ task }) : refuse("unknown_task", `No task ${msg.body.task_id}`);
        }
        case "WAIT": {
          const out = await this.waiters.wait(msg.body.task_id, msg.body.timeout_ms);
          return out
            ? reply({ task: out.task, finished: out.finished })
            : refuse("unknown_task", `No task ${msg.body.task_id}`);
        }
        case "CANCEL_TASK": {
          const task = await this.cancel(msg.body.task_id);
          return task ? reply({ task }) : refuse("unknown_task", `No task ${msg.body.task_id}`);
        }
        case "HISTORY": {
          const history = await ctx.state.getHistory(msg.body.task_id);
          return history
            ? reply({ task: history.task, history: historyView(history) })
            : refuse("unknown_task", `No task ${msg.body.task_id}`);
        }
        case "POOLS": {
          // Pool ids are routing ids: knowing one is a step towards impersonating that pool.
          const pools = this.listPools();
          return reply({
            pools: this.rolesOf(identity).has(Roles.ADMIN) ? pools : pools.map(({ pool_id: _id, ...p }) => p),
          });
        }
      }
    } catch (e) {
      const err = coerceError(e);
      const code = (err as { code?: string }).code;
      if (
        code === "unknown_template" ||
        code === "invalid_request" ||
        code === "unknown_task" ||
        code === "shutting_down"
      ) {
        return refuse(code, err.message);
      }
      // A failure that repeats for every request (the database is down) is logged a few times with a count.
      ctx.limiter.write(
        `serve:${msg.command}:${err.message}`,
        `for "failed to serve ${msg.command}: ${err.message}"`,
        "error",
        { err, command: msg.command, request_id: requestId },
        `failed to serve ${msg.command}: ${err.message}`,
        { lines: 1 },
      );
      refuse("internal_error", err.message);
    }
  }
}
