/**
 * The broker's side of the protocol, played by a test through a real ZeroMQ
 * ROUTER: it binds a unique address, records every message a pool sends
 * (decoded with the protocol's own decoder) and sends whatever the test tells
 * it to. No protocol logic of its own, so each test states the exchange.
 */
import { rmSync } from "node:fs";
import { Router } from "zeromq";

type RouterOptions = NonNullable<ConstructorParameters<typeof Router>[0]>;
import { randomUUID } from "node:crypto";
import {
  HARD_LIMIT_FACTOR,
  MAX_MESSAGE_BYTES,
  SIGNATURE,
  decodeMessage,
  encodeMessage,
  sniffEncoding,
  type BodyOf,
  type CommandName,
  type Encoding,
  type StepDispatch,
  type WelcomeBody,
} from "../../../protocol";

export type Transport = "inproc" | "ipc" | "tcp";
export const TRANSPORTS: readonly Transport[] = ["inproc", "ipc", "tcp"];

let counter = 0;
export function uniqueAddress(proto: Transport): string {
  const name = `sb-hn-${process.pid}-${++counter}-${randomUUID().slice(0, 8)}`;
  if (proto === "inproc") return `inproc://${name}`;
  if (proto === "ipc") return `ipc:///tmp/${name}.sock`;
  return "tcp://127.0.0.1:*";
}

/** One message a pool sent, decoded (or the fault when it did not decode). */
export interface Received {
  readonly identity: string;
  readonly command: string;
  readonly body: Record<string, unknown>;
  /** The body's encoding as sniffed from its first byte. */
  readonly encoding: Encoding | undefined;
  readonly valid: boolean;
  readonly faultCode: string | undefined;
}

export class FakeBroker {
  readonly router: Router;
  endpoint = "";
  /** Everything received so far, in order; `next()` takes from it. */
  readonly log: Received[] = [];
  private unread: Received[] = [];
  private waiters: (() => void)[] = [];
  private sendChain: Promise<void> = Promise.resolve();
  private closed = false;

  private constructor(options: RouterOptions) {
    this.router = new Router({ handover: true, linger: 0, sendTimeout: 1000, ...options });
  }

  /** Binds a ROUTER at a fresh address; `options` adds socket options (CURVE, say). */
  static async bind(proto: Transport, options: RouterOptions = {}): Promise<FakeBroker> {
    const b = new FakeBroker(options);
    await b.router.bind(uniqueAddress(proto));
    b.endpoint = b.router.lastEndpoint!;
    void b.readLoop();
    return b;
  }

  private async readLoop(): Promise<void> {
    try {
      for await (const [id, ...frames] of this.router) {
        const decoded = decodeMessage(frames, { maxBytes: MAX_MESSAGE_BYTES * HARD_LIMIT_FACTOR });
        const rec: Received = decoded.ok
          ? {
              identity: id!.toString(),
              command: decoded.message.command,
              body: decoded.message.body as unknown as Record<string, unknown>,
              encoding: decoded.encoding,
              valid: true,
              faultCode: undefined,
            }
          : {
              identity: id!.toString(),
              command: frames[1]?.toString() ?? "",
              body: {},
              encoding: frames[2] ? sniffEncoding(frames[2]) : undefined,
              valid: false,
              faultCode: decoded.fault.code,
            };
        this.log.push(rec);
        this.unread.push(rec);
        const w = this.waiters;
        this.waiters = [];
        for (const f of w) f();
      }
    } catch {
      // closed
    }
  }

  /**
   * The next unread message matching `command` (and `where`); unread messages
   * of other commands stay for later calls. Fails after `timeoutMs`.
   */
  async next(
    command: string,
    where: (r: Received) => boolean = () => true,
    timeoutMs = 5000,
  ): Promise<Received> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const i = this.unread.findIndex((r) => r.command === command && where(r));
      if (i >= 0) return this.unread.splice(i, 1)[0]!;
      const left = deadline - Date.now();
      if (left <= 0 || this.closed) {
        throw new Error(
          `no ${command} within ${timeoutMs} ms; received: ${this.log.map((r) => r.command).join(", ") || "nothing"}`,
        );
      }
      await new Promise<void>((resolve) => {
        const t = setTimeout(done, left);
        function done(): void {
          clearTimeout(t);
          resolve();
        }
        this.waiters.push(done);
      });
    }
  }

  /** Unread messages, without taking them. */
  peek(): readonly Received[] {
    return this.unread;
  }

  /** Drops unread messages of this command (heartbeats, usually). */
  discard(command: string): void {
    this.unread = this.unread.filter((r) => r.command !== command);
  }

  send<C extends CommandName>(
    identity: string,
    command: C,
    body: BodyOf<C>,
    encoding: Encoding = "json",
  ): Promise<void> {
    return this.sendRaw(identity, encodeMessage(command, body, encoding));
  }

  sendRaw(identity: string, frames: (Buffer | string)[]): Promise<void> {
    const p = this.sendChain.then(() => this.router.send([identity, ...frames]));
    this.sendChain = p.catch(() => {});
    return p;
  }

  /** Sends WELCOME with short heartbeats (so tests stay quick) unless overridden. */
  welcome(identity: string, overrides: Partial<WelcomeBody> = {}): Promise<void> {
    return this.send(identity, "WELCOME", {
      broker_id: "fake-broker",
      encoding: "json",
      heartbeat_ms: 100,
      heartbeat_liveness: 5,
      max_message_bytes: MAX_MESSAGE_BYTES,
      max_batch: 64,
      adopted: [],
      ...overrides,
    });
  }

  /** Waits for a HELLO and answers WELCOME; returns the HELLO. */
  async handshake(overrides: Partial<WelcomeBody> = {}): Promise<Received> {
    const hello = await this.next("HELLO");
    await this.welcome(hello.identity, overrides);
    return hello;
  }

  close(): void {
    this.closed = true;
    this.router.close();
    // libzmq leaves the socket file of an ipc:// endpoint behind; tests leave nothing.
    if (this.endpoint.startsWith("ipc://")) rmSync(this.endpoint.slice("ipc://".length), { force: true });
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }
}

export const SIG = SIGNATURE;

/** A valid STEP entry; override what the test cares about. */
export function stepFor(handler: string, overrides: Partial<StepDispatch> = {}): StepDispatch {
  return {
    task_id: randomUUID(),
    step_id: randomUUID(),
    attempt_id: randomUUID(),
    step_name: handler,
    handler,
    attempt: 1,
    max_attempts: 3,
    timeout_ms: 30_000,
    template: { namespace: "test", name: "flow", version: "1" },
    context: {},
    config: {},
    inputs: {},
    ...overrides,
  };
}

/** Resolves after `ms` (for handlers that must still be running when the test acts). */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason as Error);
    const t = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    function onAbort(): void {
      clearTimeout(t);
      reject(signal!.reason as Error);
    }
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}
