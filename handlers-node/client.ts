/**
 * A client for services that start work: submit a task, read its status,
 * wait for its end, cancel it, list pools — over the broker's own socket, so
 * no database access or broker code is needed. Other languages speak the same
 * client commands (PROTOCOL.md, "Clients").
 */
import { randomUUID } from "node:crypto";
import { Dealer } from "zeromq";
import {
  ClientCommands,
  decodeMessage,
  encodeMessage,
  HARD_LIMIT_FACTOR,
  MAX_MESSAGE_BYTES,
  type BodyOf,
  type Encoding,
  type ErrorBody,
  type PoolView,
  type ReplyBody,
  type TaskHistoryView,
  type TaskView,
} from "../protocol";

export interface ClientOptions {
  endpoint: string;
  encoding?: Encoding;
  /** How long to wait for a reply (WAIT adds its own timeout to this). */
  requestTimeoutMs?: number;
  curve?: { serverPublicKey: string; publicKey: string; secretKey: string };
}

/** An ERROR the broker answered with; match on `code` (e.g. message_too_large, reply_too_large). */
export class BrokerError extends Error {
  readonly code: string;
  /** The command the broker refused, when it said. */
  readonly command: string | undefined;
  constructor(body: ErrorBody) {
    super(`${body.code}: ${body.message}`);
    this.name = "BrokerError";
    this.code = body.code;
    this.command = body.command;
  }
}

/** No answer came within the request's time: the broker is not there, or died with the request. */
export class NoReplyError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "NoReplyError";
  }
}

/** Backoff between WAITs again after a broker stopped or did not answer. */
const WAIT_RETRY_MIN_MS = 100;
const WAIT_RETRY_MAX_MS = 5000;

interface Pending {
  resolve(body: ReplyBody): void;
  reject(err: Error): void;
  timer: NodeJS.Timeout;
}

type Request = keyof typeof ClientCommands;
const ANSWERS = new Set(["REPLY", "ERROR"]);

export class StepbrokerClient {
  private readonly socket: Dealer;
  private readonly pending = new Map<string, Pending>();
  private sendChain: Promise<unknown> = Promise.resolve();
  private readonly encoding: Encoding;
  private readonly timeoutMs: number;
  private closed = false;
  /** Whether the socket uses CURVE, for the hint when no reply comes. */
  private readonly curve: boolean;

  constructor(opts: ClientOptions) {
    this.curve = opts.curve !== undefined;
    this.encoding = opts.encoding ?? "json";
    this.timeoutMs = opts.requestTimeoutMs ?? 10_000;
    this.socket = new Dealer({
      linger: 0,
      ...(opts.curve
        ? {
            curveServerKey: opts.curve.serverPublicKey,
            curvePublicKey: opts.curve.publicKey,
            curveSecretKey: opts.curve.secretKey,
          }
        : {}),
    });
    this.socket.connect(opts.endpoint);
    void this.readLoop();
  }

  async submit(
    template: { namespace: string; name: string; version?: string },
    context: Record<string, unknown>,
    opts: { idempotencyKey?: string; priority?: number; traceparent?: string; tracestate?: string } = {},
  ): Promise<{ task: TaskView; created: boolean }> {
    const body: Omit<BodyOf<"SUBMIT">, "request_id"> = { template, context };
    if (opts.idempotencyKey !== undefined) body.idempotency_key = opts.idempotencyKey;
    if (opts.priority !== undefined) body.priority = opts.priority;
    if (opts.traceparent !== undefined) body.traceparent = opts.traceparent;
    if (opts.tracestate !== undefined) body.tracestate = opts.tracestate;
    const r = await this.request("SUBMIT", body);
    return { task: r.task!, created: r.created ?? true };
  }

  async status(taskId: string): Promise<TaskView> {
    return (await this.request("STATUS", { task_id: taskId })).task!;
  }

  /** The task with every transition and attempt of it and its steps (HISTORY), so no SQL is needed. */
  async history(taskId: string): Promise<{ task: TaskView; history: TaskHistoryView }> {
    const r = await this.request("HISTORY", { task_id: taskId });
    return { task: r.task!, history: r.history! };
  }

  /**
   * Waits up to `timeoutMs` for the task to end. A broker that stops under
   * the WAIT (ERROR shutting_down) or never answers it (it died) does not end
   * the wait: the client WAITs again, with backoff, for the time that is left
   * (PROTOCOL.md, Clients), so a restarted broker, or another one behind the
   * same endpoint, answers it.
   */
  async wait(taskId: string, timeoutMs: number): Promise<{ task: TaskView; finished: boolean }> {
    const deadline = Date.now() + timeoutMs;
    let delayMs = WAIT_RETRY_MIN_MS;
    for (;;) {
      const left = Math.max(1, deadline - Date.now());
      try {
        const r = await this.request("WAIT", { task_id: taskId, timeout_ms: left }, left);
        return { task: r.task!, finished: r.finished ?? false };
      } catch (e) {
        const again = e instanceof NoReplyError || (e instanceof BrokerError && e.code === "shutting_down");
        if (!again || this.closed || Date.now() + delayMs >= deadline) throw e;
        await new Promise((r) => setTimeout(r, delayMs));
        delayMs = Math.min(delayMs * 2, WAIT_RETRY_MAX_MS);
      }
    }
  }

  async cancel(taskId: string): Promise<TaskView> {
    return (await this.request("CANCEL_TASK", { task_id: taskId })).task!;
  }

  async pools(): Promise<PoolView[]> {
    return (await this.request("POOLS", {})).pools ?? [];
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      p.reject(new Error("client closed"));
    }
    this.pending.clear();
    this.socket.close();
  }

  private request<C extends Request>(
    command: C,
    body: Omit<BodyOf<C>, "request_id">,
    extraMs = 0,
  ): Promise<ReplyBody> {
    if (this.closed) return Promise.reject(new Error("client closed"));
    const requestId = randomUUID();
    return new Promise<ReplyBody>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(requestId);
        reject(
          new NoReplyError(
            `no reply to ${command} within ${this.timeoutMs + extraMs} ms: is a broker running at this endpoint?${
              this.curve
                ? " Over CURVE a refused key gets no answer: check that this client's public key is on the allow-list of that socket (a client or admin endpoint) and that the server key is the broker's"
                : ""
            }`,
          ),
        );
      }, this.timeoutMs + extraMs);
      this.pending.set(requestId, { resolve, reject, timer });
      // request_id first: a broker that refuses a body too large to parse finds it by scanning the first bytes.
      const frames = encodeMessage(command, { request_id: requestId, ...body } as BodyOf<C>, this.encoding);
      // One pending send per socket: chain them.
      this.sendChain = this.sendChain
        .then(() => this.socket.send(frames))
        .catch((e: unknown) => {
          clearTimeout(timer);
          this.pending.delete(requestId);
          reject(e instanceof Error ? e : new Error(String(e)));
        });
    });
  }

  private async readLoop(): Promise<void> {
    try {
      for await (const frames of this.socket) {
        // The broker never sends a REPLY over max_message_bytes (it answers reply_too_large instead);
        // the hard limit only guards against a peer that is not a broker.
        const decoded = decodeMessage(frames, {
          accept: ANSWERS,
          maxBytes: MAX_MESSAGE_BYTES * HARD_LIMIT_FACTOR,
        });
        if (!decoded.ok) continue;
        const msg = decoded.message;
        const requestId = (msg.body as { request_id?: string }).request_id;
        const waiting = requestId ? this.pending.get(requestId) : undefined;
        if (!waiting || !requestId) continue;
        this.pending.delete(requestId);
        clearTimeout(waiting.timer);
        if (msg.command === "REPLY") waiting.resolve(msg.body);
        else if (msg.command === "ERROR") waiting.reject(new BrokerError(msg.body));
      }
    } catch {
      // closed
    }
  }
}
