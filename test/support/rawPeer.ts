/**
 * A raw ZeroMQ DEALER that speaks to a real broker with no SDK in between:
 * a test sends exactly the frames it wants (garbage included) and reads what
 * the broker answers, decoded with the protocol's own decoder. It has no
 * protocol logic beyond an optional heartbeat, so each test states the
 * exchange it checks.
 */
import { randomBytes, randomUUID } from "node:crypto";
import { Dealer } from "zeromq";
import {
  HARD_LIMIT_FACTOR,
  MAX_MESSAGE_BYTES,
  SIGNATURE,
  decodeMessage,
  encodeMessage,
  type BodyOf,
  type CommandName,
  type Encoding,
} from "../../protocol";

/** One message from the broker. `body` is the decoded body (undefined when it did not decode). */
export interface Incoming {
  readonly command: string;
  readonly body: Record<string, unknown>;
}

/** CURVE keys for a raw peer: the broker's public key and the peer's own pair (Z85). */
export interface PeerCurve {
  serverPublicKey: string;
  publicKey: string;
  secretKey: string;
}

export class RawPeer {
  readonly socket: Dealer;
  readonly id: string;
  /** Everything received, in order; `next()` takes from the unread part. */
  readonly received: Incoming[] = [];
  private unread: Incoming[] = [];
  private wake: (() => void) | undefined;
  /** zeromq.js allows one pending send per socket: every send waits for the one before. */
  private chain: Promise<void> = Promise.resolve();
  private heartbeat: NodeJS.Timeout | undefined;
  private closed = false;

  private constructor(id: string, curve: PeerCurve | undefined) {
    this.id = id;
    this.socket = new Dealer({
      routingId: id,
      linger: 0,
      sendTimeout: 2000,
      ...(curve
        ? {
            curveServerKey: curve.serverPublicKey,
            curvePublicKey: curve.publicKey,
            curveSecretKey: curve.secretKey,
          }
        : {}),
    });
  }

  /** Connects a DEALER with routing id `id` (a fresh one by default) to `endpoint`, over CURVE when given keys. */
  static connect(endpoint: string, id = `raw-${randomBytes(4).toString("hex")}`, curve?: PeerCurve): RawPeer {
    const peer = new RawPeer(id, curve);
    peer.socket.connect(endpoint);
    void peer.readLoop();
    return peer;
  }

  private async readLoop(): Promise<void> {
    try {
      for await (const frames of this.socket) {
        const decoded = decodeMessage(frames, { maxBytes: MAX_MESSAGE_BYTES * HARD_LIMIT_FACTOR });
        const msg: Incoming = decoded.ok
          ? {
              command: decoded.message.command,
              body: decoded.message.body as unknown as Record<string, unknown>,
            }
          : { command: `(undecodable: ${decoded.fault.code})`, body: {} };
        this.received.push(msg);
        this.unread.push(msg);
        this.wake?.();
      }
    } catch {
      // Closing the socket ends a pending receive; nothing else to do.
    }
  }

  /** Sends raw frames (the routing id is added by ZeroMQ). */
  sendFrames(frames: (Buffer | string)[]): Promise<void> {
    const send = this.chain.then(() =>
      this.socket.send(frames.map((f) => (typeof f === "string" ? Buffer.from(f) : f))),
    );
    this.chain = send.catch(() => undefined);
    return send;
  }

  /** Sends a well-formed command with a body that the test vouches for (or not: no validation here). */
  send<C extends CommandName>(command: C, body: BodyOf<C>, encoding: Encoding = "json"): Promise<void> {
    return this.sendFrames(encodeMessage(command, body, encoding));
  }

  /** Sends a command with any JSON value as its body, valid or not. */
  sendJson(command: string, body: unknown): Promise<void> {
    return this.sendFrames([SIGNATURE, command, Buffer.from(JSON.stringify(body))]);
  }

  /** HELLO for `handlers`, then waits for WELCOME; keeps heartbeating unless told not to. */
  async hello(
    handlers: string[],
    opts: { capacity?: number; heartbeatMs?: number; running?: string[] } = {},
  ): Promise<Record<string, unknown>> {
    await this.send("HELLO", {
      pool_id: this.id,
      handlers,
      capacity: opts.capacity ?? 1,
      sdk: { language: "node", name: "raw-test-peer", version: "0" },
      ...(opts.running ? { running: opts.running } : {}),
    });
    const welcome = await this.next("WELCOME");
    if (opts.heartbeatMs !== undefined) this.startHeartbeat(opts.heartbeatMs);
    return welcome.body;
  }

  /** Heartbeats every `ms`, as a live pool does, so the broker does not purge this peer. */
  startHeartbeat(ms: number): void {
    this.stopHeartbeat();
    this.heartbeat = setInterval(() => void this.send("HEARTBEAT", {}).catch(() => undefined), ms);
  }

  stopHeartbeat(): void {
    clearInterval(this.heartbeat);
    this.heartbeat = undefined;
  }

  /**
   * The broker's next answer: the next unread message that is not a
   * HEARTBEAT (the broker heartbeats a registered pool whenever it is idle).
   * With `command`, that answer must be this command: anything else arriving
   * first fails the test, so an unexpected ERROR is never skipped silently.
   */
  async next(command?: string, timeoutMs = 5000): Promise<Incoming> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      while (this.unread.length > 0) {
        const m = this.unread.shift()!;
        if (m.command === "HEARTBEAT" && command !== "HEARTBEAT") continue;
        if (command !== undefined && m.command !== command) {
          throw new Error(`${this.id}: expected ${command}, got ${m.command} ${JSON.stringify(m.body)}`);
        }
        return m;
      }
      const left = deadline - Date.now();
      if (left <= 0) {
        const seen = this.received.map((m) => m.command).join(", ") || "nothing";
        throw new Error(
          `${this.id}: no ${command ?? "answer"} within ${timeoutMs} ms (received so far: ${seen})`,
        );
      }
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.wake = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this.wake = undefined;
    }
  }

  /**
   * The first unread `command`, whatever arrives before it (those stay
   * unread): for exchanges where the order of two broker messages is not
   * part of the contract, such as a STEP dispatched while an ACK commits.
   */
  async take(command: string, timeoutMs = 5000): Promise<Incoming> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const i = this.unread.findIndex((m) => m.command === command);
      if (i >= 0) return this.unread.splice(i, 1)[0]!;
      const left = deadline - Date.now();
      if (left <= 0) {
        const seen = this.received.map((m) => m.command).join(", ") || "nothing";
        throw new Error(`${this.id}: no ${command} within ${timeoutMs} ms (received so far: ${seen})`);
      }
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.wake = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this.wake = undefined;
    }
  }

  /** Asks POOLS with a fresh request id and returns that id (the answer is a REPLY carrying it). */
  async probe(): Promise<string> {
    const requestId = randomUUID();
    await this.send("POOLS", { request_id: requestId });
    return requestId;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.stopHeartbeat();
    this.socket.close();
  }
}
