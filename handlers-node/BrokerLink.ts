/**
 * One pool's session with one broker: a DEALER whose routing id is the pool
 * id, its outbox and reader loop, the HELLO/WELCOME handshake, heartbeats,
 * silence detection and reconnects. What to do with steps, acks and cancels
 * belongs to the owner (HandlerPool); this file only speaks the protocol.
 *
 * States (a link moves only through `setState`):
 *  IDLE        not opened yet
 *  HELLO_SENT  socket open, HELLO sent, waiting for WELCOME. Only HELLO may be
 *              sent. Without WELCOME within heartbeat × liveness the socket is
 *              closed and a fresh one says HELLO again (after a backoff): a
 *              DEALER queues messages for an absent peer, and a fresh socket
 *              drops that stale queue.
 *  WELCOMED    the broker accepted HELLO; its terms (encoding, heartbeat,
 *              limits) apply. Results, progress, heartbeats flow.
 *  BACKOFF     socket closed after silence, DISCONNECT or a send failure;
 *              a timer opens a fresh one (100 ms doubling to 5 s by default).
 *  CLOSED      for good.
 */
import { Dealer } from "zeromq";
import type { Logger } from "pino";
import {
  BrokerCommands,
  Encodings,
  HARD_LIMIT_FACTOR,
  ID_PATTERN,
  MAX_BATCH,
  MAX_MESSAGE_BYTES,
  coerceError,
  decodeBody,
  decodeMessage,
  encodeMessage,
  faultToErrorBody,
  type AckItem,
  type BodyOf,
  type CancelItem,
  type CommandName,
  type Encoding,
  type ErrorBody,
  type HelloBody,
  type ProgressItem,
  type ResultItem,
  type StepDispatch,
  type WelcomeBody,
} from "../protocol";
import { Outbox } from "./Outbox";
import type { CurveOptions } from "./types";

export const LinkStates = {
  IDLE: "idle",
  HELLO_SENT: "hello_sent",
  WELCOMED: "welcomed",
  BACKOFF: "backoff",
  CLOSED: "closed",
} as const;
export type LinkState = (typeof LinkStates)[keyof typeof LinkStates];

const LEGAL_MOVES: Record<LinkState, readonly LinkState[]> = {
  idle: ["hello_sent", "closed"],
  hello_sent: ["welcomed", "backoff", "closed", "hello_sent"],
  welcomed: ["hello_sent", "backoff", "closed", "welcomed"],
  backoff: ["hello_sent", "closed"],
  closed: [],
};

const ITEM_PATH = /^\/(?:steps|acks|cancels)\/(\d+)(?:\/|$)/;

/**
 * For a schema violation inside one STEP/ACK/CANCEL item, that item's
 * attempt_id when it is readable, so the broker can tell which attempt the
 * ERROR is about (it cannot map an instance path back to what it sent).
 */
function attemptIdAt(frames: Buffer[], instancePath: string | undefined): { attempt_id?: string } {
  const m = instancePath ? ITEM_PATH.exec(instancePath) : null;
  if (!m || frames.length !== 3) return {};
  const decoded = decodeBody(frames[2]!);
  if (!decoded.ok) return {};
  const list = Object.values(decoded.value)[0];
  const item: unknown = Array.isArray(list) ? list[Number(m[1])] : undefined;
  const id = item && typeof item === "object" ? (item as { attempt_id?: unknown }).attempt_id : undefined;
  return typeof id === "string" && ID_PATTERN.test(id) ? { attempt_id: id } : {};
}

const BROKER_ACCEPT: ReadonlySet<string> = new Set(Object.values(BrokerCommands));
/** Most ids in one DISCONNECT.handed_back and one HELLO.running (the schemas' maxItems). */
const MAX_IDS = 10_000;
/** ERROR replies to a broker's bad messages are dropped while this many messages wait to be sent. */
const MAX_QUEUED_FOR_ERROR_REPLY = 100;

/** The terms of a session: the broker's WELCOME, or these defaults before one. */
export interface SessionTerms {
  encoding: Encoding;
  heartbeatMs: number;
  liveness: number;
  maxMessageBytes: number;
  maxBatch: number;
}

/** What a link asks of its pool. */
export interface LinkOwner {
  helloFor(link: BrokerLink): HelloBody;
  inFlight(link: BrokerLink): number;
  /** Attempts released while their handlers run (cancelled, handed back): HEARTBEAT `cancelling`. */
  cancelling(link: BrokerLink): string[];
  onWelcome(link: BrokerLink, welcome: WelcomeBody): void;
  onSteps(link: BrokerLink, steps: StepDispatch[]): void;
  onAcks(link: BrokerLink, acks: AckItem[]): void;
  onCancels(link: BrokerLink, cancels: CancelItem[]): void;
  onHelloRejected(link: BrokerLink, error: ErrorBody): void;
  /** A single result too large for max_message_bytes: the owner stores and returns its replacement. */
  replaceOversizedResult(link: BrokerLink, item: ResultItem, bytes: number): ResultItem;
}

export interface BrokerLinkOptions {
  endpoint: string;
  routingId: string;
  encoding: Encoding;
  heartbeatMs: number;
  liveness: number;
  reconnectInitialMs: number;
  reconnectMaxMs: number;
  curve: CurveOptions | undefined;
  logger: Logger;
  owner: LinkOwner;
}

interface Session {
  readonly socket: Dealer;
  readonly outbox: Outbox;
}

export class BrokerLink {
  readonly endpoint: string;
  readonly log: Logger;
  private _state: LinkState = LinkStates.IDLE;
  private _terms: SessionTerms;
  private brokerId: string | undefined;
  private session: Session | undefined;
  private lastSentAt = 0;
  private lastHeardAt = 0;
  private backoffMs: number;
  private tickTimer: NodeJS.Timeout | undefined;
  private backoffTimer: NodeJS.Timeout | undefined;
  private flushHandle: NodeJS.Immediate | undefined;
  private readonly pendingResults = new Map<string, ResultItem>();
  private readonly pendingProgress = new Map<string, ProgressItem>();
  private readonly pendingHandBack = new Set<string>();
  private leaving = false;
  private goodbyeSent = false;

  constructor(private readonly opts: BrokerLinkOptions) {
    this.endpoint = opts.endpoint;
    this.log = opts.logger.child({ endpoint: opts.endpoint });
    this.backoffMs = opts.reconnectInitialMs;
    this._terms = {
      encoding: Encodings.JSON,
      heartbeatMs: opts.heartbeatMs,
      liveness: opts.liveness,
      maxMessageBytes: MAX_MESSAGE_BYTES,
      maxBatch: MAX_BATCH,
    };
  }

  get state(): LinkState {
    return this._state;
  }

  get terms(): Readonly<SessionTerms> {
    return this._terms;
  }

  get welcomed(): boolean {
    return this._state === LinkStates.WELCOMED;
  }

  /** Opens the first socket and says HELLO. */
  open(): void {
    if (this._state !== LinkStates.IDLE) return;
    this.openSession();
  }

  /** Queues a RESULT entry; entries queued in the same event-loop turn share one message. */
  queueResult(item: ResultItem): void {
    this.pendingProgress.delete(item.attempt_id);
    this.pendingResults.set(item.attempt_id, item);
    this.scheduleFlush();
  }

  /** Queues a PROGRESS entry; several calls for one attempt within a turn keep the last. */
  queueProgress(item: ProgressItem): void {
    if (this._state !== LinkStates.WELCOMED) return; // only HELLO may be sent before WELCOME
    this.pendingProgress.set(item.attempt_id, item);
    this.scheduleFlush();
  }

  /** Attempts this pool will not finish: listed in the next DISCONNECT's handed_back. */
  handBack(attemptIds: Iterable<string>): void {
    for (const id of attemptIds) {
      this.pendingResults.delete(id);
      this.pendingProgress.delete(id);
      this.pendingHandBack.add(id);
    }
    this.scheduleFlush();
  }

  /** From now on every session with this broker says DISCONNECT (the pool is closing). */
  leave(): void {
    this.leaving = true;
    this.scheduleFlush();
  }

  /** Resolves when everything queued so far has been handed to libzmq (or after `timeoutMs`). */
  async whenSent(timeoutMs: number): Promise<void> {
    if (this.flushHandle) {
      clearImmediate(this.flushHandle);
      this.flush();
    }
    await this.session?.outbox.whenIdle(timeoutMs);
  }

  /**
   * Closes for good. `lingerMs` > 0 only for a graceful goodbye, so the last
   * DISCONNECT already handed to libzmq still leaves; 0 everywhere else.
   */
  close(lingerMs = 0): void {
    if (this._state === LinkStates.CLOSED) return;
    this.setState(LinkStates.CLOSED);
    this.clearTimers();
    this.closeSession(lingerMs);
    this.pendingResults.clear();
    this.pendingProgress.clear();
    this.pendingHandBack.clear();
  }

  // ---------------------------------------------------------------- session

  private setState(next: LinkState): void {
    const legal = LEGAL_MOVES[this._state];
    if (!legal.includes(next)) throw new Error(`broker link: illegal move ${this._state} -> ${next}`);
    this._state = next;
  }

  private openSession(): void {
    const socket = new Dealer({
      routingId: this.opts.routingId,
      linger: 0,
      sendTimeout: 0,
      reconnectInterval: this.opts.reconnectInitialMs,
      reconnectMaxInterval: this.opts.reconnectMaxMs,
    });
    if (this.opts.curve) {
      socket.curveServerKey = this.opts.curve.serverPublicKey;
      socket.curvePublicKey = this.opts.curve.publicKey;
      socket.curveSecretKey = this.opts.curve.secretKey;
    }
    const session: Session = {
      socket,
      outbox: new Outbox(socket, (err) => this.onSendError(session, err)),
    };
    this.session = session;
    try {
      socket.connect(this.opts.endpoint);
    } catch (e) {
      // A malformed endpoint cannot get better by retrying, but a transient
      // failure might: log loudly and retry with backoff either way.
      this.log.error({ err: coerceError(e) }, `cannot connect to ${this.opts.endpoint}`);
      this.setState(LinkStates.HELLO_SENT);
      this.reconnect("connect failed");
      return;
    }
    void this.readLoop(session);
    this.lastHeardAt = performance.now();
    this.sayHello();
  }

  private sayHello(): void {
    this.setState(LinkStates.HELLO_SENT);
    const hello = this.opts.owner.helloFor(this);
    // A HELLO hands back implicitly: the broker makes every attempt it had at
    // this pool and that `running` does not list ready again.
    this.pendingHandBack.clear();
    this.pendingResults.clear();
    this.pendingProgress.clear();
    this.sendNow("HELLO", hello, Encodings.JSON);
    this.log.debug({ running: hello.running?.length ?? 0 }, `HELLO sent to ${this.endpoint}`);
    this.scheduleTick();
  }

  private reconnect(why: string): void {
    if (this._state === LinkStates.CLOSED) return;
    const delay = this.backoffMs;
    this.backoffMs = Math.min(this.backoffMs * 2, this.opts.reconnectMaxMs);
    this.log.warn(`reconnecting to ${this.endpoint} in ${delay} ms: ${why}`);
    this.clearTimers();
    this.closeSession(0);
    this.setState(LinkStates.BACKOFF);
    this.backoffTimer = setTimeout(() => {
      this.backoffTimer = undefined;
      if (this._state === LinkStates.BACKOFF) this.openSession();
    }, delay);
  }

  private closeSession(lingerMs: number): void {
    const s = this.session;
    if (!s) return;
    this.session = undefined;
    s.outbox.close();
    try {
      s.socket.linger = lingerMs;
      s.socket.close(); // ends the reader loop's iteration
    } catch (e) {
      this.log.debug({ err: coerceError(e) }, "closing the socket failed");
    }
  }

  private clearTimers(): void {
    if (this.tickTimer) clearTimeout(this.tickTimer);
    if (this.backoffTimer) clearTimeout(this.backoffTimer);
    if (this.flushHandle) clearImmediate(this.flushHandle);
    this.tickTimer = this.backoffTimer = this.flushHandle = undefined;
  }

  private onSendError(session: Session, err: Error): void {
    if (this.session !== session) return;
    this.log.warn({ err }, `sending to ${this.endpoint} failed`);
    this.reconnect(`send failed (${(err as { code?: unknown }).code ?? err.message})`);
  }

  // ------------------------------------------------------- liveness (timer)

  /**
   * One timer per link, set for the next thing due: a HEARTBEAT after
   * heartbeat_ms without sending, or giving up on the broker after
   * heartbeat_ms × liveness without hearing from it. It runs on the event loop
   * that runs the handlers, so a stuck loop stops heartbeating.
   */
  private scheduleTick(): void {
    if (this.tickTimer) clearTimeout(this.tickTimer);
    const now = performance.now();
    const { heartbeatMs, liveness } = this._terms;
    let due = this.lastHeardAt + heartbeatMs * liveness;
    if (this._state === LinkStates.WELCOMED) due = Math.min(due, this.lastSentAt + heartbeatMs);
    this.tickTimer = setTimeout(() => this.tick(), Math.max(1, Math.ceil(due - now)));
  }

  private tick(): void {
    this.tickTimer = undefined;
    if (this._state !== LinkStates.HELLO_SENT && this._state !== LinkStates.WELCOMED) return;
    const now = performance.now();
    const { heartbeatMs, liveness } = this._terms;
    const silentMs = now - this.lastHeardAt;
    if (silentMs >= heartbeatMs * liveness) {
      this.reconnect(
        this._state === LinkStates.WELCOMED
          ? `broker silent for ${Math.round(silentMs)} ms`
          : `no WELCOME within ${Math.round(silentMs)} ms`,
      );
      return;
    }
    if (
      this._state === LinkStates.WELCOMED &&
      now - this.lastSentAt >= heartbeatMs &&
      (this.session?.outbox.size ?? 0) === 0
    ) {
      this.heartbeatNow();
    }
    this.scheduleTick();
  }

  /** Sends a HEARTBEAT now (when welcomed): also how the broker learns that a cancelled handler returned. */
  heartbeatNow(): void {
    if (this._state !== LinkStates.WELCOMED) return;
    this.send("HEARTBEAT", {
      in_flight: this.opts.owner.inFlight(this),
      cancelling: this.opts.owner.cancelling(this),
    });
  }

  // ------------------------------------------------------------- sending

  private send<C extends CommandName>(command: C, body: BodyOf<C>): void {
    this.sendNow(command, body, this._terms.encoding);
  }

  private sendNow<C extends CommandName>(command: C, body: BodyOf<C>, encoding: Encoding): void {
    const s = this.session;
    if (!s) return;
    s.outbox.push(encodeMessage(command, body, encoding));
    this.lastSentAt = performance.now();
  }

  private scheduleFlush(): void {
    if (this.flushHandle || this._state === LinkStates.CLOSED) return;
    this.flushHandle = setImmediate(() => {
      this.flushHandle = undefined;
      this.flush();
    });
  }

  /** Sends what this turn produced: results, then progress, then the goodbye. */
  private flush(): void {
    if (this._state !== LinkStates.WELCOMED) {
      // Kept by the pool; resent after the next WELCOME.
      this.pendingResults.clear();
      this.pendingProgress.clear();
      return;
    }
    if (this.pendingResults.size > 0) {
      const items = [...this.pendingResults.values()];
      this.pendingResults.clear();
      for (const frames of this.chunk("RESULT", items)) this.sendFrames(frames);
    }
    if (this.pendingProgress.size > 0) {
      const items = [...this.pendingProgress.values()];
      this.pendingProgress.clear();
      for (const frames of this.chunk("PROGRESS", items)) this.sendFrames(frames);
    }
    if (this.leaving && (!this.goodbyeSent || this.pendingHandBack.size > 0)) {
      const ids = [...this.pendingHandBack];
      this.pendingHandBack.clear();
      do {
        const handed = ids.splice(0, MAX_IDS);
        this.send("DISCONNECT", { reason: "the pool is closing", handed_back: handed });
      } while (ids.length > 0);
      this.goodbyeSent = true;
      this.log.debug(`DISCONNECT sent to ${this.endpoint}`);
    }
  }

  private sendFrames(frames: Buffer[]): void {
    this.session?.outbox.push(frames);
    this.lastSentAt = performance.now();
  }

  /**
   * Splits items into messages of at most max_batch items and max_message_bytes
   * of body, halving a batch until it fits. A single result that cannot fit is
   * replaced by an error result (the owner keeps the replacement).
   */
  private chunk(command: "RESULT" | "PROGRESS", items: (ResultItem | ProgressItem)[]): Buffer[][] {
    const out: Buffer[][] = [];
    const { maxBatch, maxMessageBytes, encoding } = this._terms;
    const encode = (part: (ResultItem | ProgressItem)[]): Buffer[] =>
      command === "RESULT"
        ? encodeMessage("RESULT", { results: part as ResultItem[] }, encoding)
        : encodeMessage("PROGRESS", { progress: part as ProgressItem[] }, encoding);
    const pending: (ResultItem | ProgressItem)[][] = [];
    for (let i = 0; i < items.length; i += maxBatch) pending.push(items.slice(i, i + maxBatch));
    while (pending.length > 0) {
      const part = pending.shift()!;
      const frames = encode(part);
      const bytes = frames[2]!.byteLength;
      if (bytes <= maxMessageBytes) {
        out.push(frames);
      } else if (part.length > 1) {
        const half = Math.ceil(part.length / 2);
        pending.unshift(part.slice(0, half), part.slice(half));
      } else if (command === "RESULT") {
        out.push(encode([this.opts.owner.replaceOversizedResult(this, part[0] as ResultItem, bytes)]));
      } else {
        this.log.warn(`dropping a PROGRESS of ${bytes} bytes: over the broker's limit`);
      }
    }
    return out;
  }

  // ------------------------------------------------------------- receiving

  /** The socket's only receive(): one loop per socket, ended by closing it. */
  private async readLoop(session: Session): Promise<void> {
    try {
      for await (const frames of session.socket) {
        if (this.session !== session) return;
        try {
          this.onFrames(frames);
        } catch (e) {
          this.log.error({ err: coerceError(e) }, "handling a message from the broker failed");
        }
      }
    } catch (e) {
      if (this.session !== session || this._state === LinkStates.CLOSED) return;
      this.log.warn({ err: coerceError(e) }, `receiving from ${this.endpoint} failed`);
      this.reconnect("receive failed");
    }
  }

  private onFrames(frames: Buffer[]): void {
    this.lastHeardAt = performance.now(); // any message is a sign of life
    const decoded = decodeMessage(frames, {
      accept: BROKER_ACCEPT,
      maxBytes: this._terms.maxMessageBytes * HARD_LIMIT_FACTOR,
    });
    if (!decoded.ok) {
      const { fault } = decoded;
      const command = frames.length === 3 ? frames[1]!.toString("latin1").slice(0, 64) : undefined;
      this.log.warn(
        { code: fault.code, command, schema_path: fault.schemaPath, instance_path: fault.instancePath },
        `bad message from the broker: ${fault.message}`,
      );
      // Never answer an ERROR with an ERROR; send nothing but HELLO before WELCOME.
      if (
        command !== "ERROR" &&
        this._state === LinkStates.WELCOMED &&
        (this.session?.outbox.size ?? 0) < MAX_QUEUED_FOR_ERROR_REPLY
      ) {
        this.send("ERROR", faultToErrorBody(fault, attemptIdAt(frames, fault.instancePath)));
      }
      return;
    }
    const { message } = decoded;
    switch (message.command) {
      case "WELCOME":
        return this.onWelcome(message.body);
      case "STEP":
        return this.opts.owner.onSteps(this, message.body.steps);
      case "ACK":
        return this.opts.owner.onAcks(this, message.body.acks);
      case "CANCEL":
        return this.opts.owner.onCancels(this, message.body.cancels);
      case "HEARTBEAT":
        return;
      case "DISCONNECT": {
        const { code, reason } = message.body;
        this.log.info(
          { code },
          `broker ${this.brokerId ?? this.endpoint} disconnected us: ${reason ?? code ?? "no reason given"}`,
        );
        return this.reconnect(`broker sent DISCONNECT${code ? ` (${code})` : ""}`);
      }
      case "ERROR":
        return this.onError(message.body);
      default:
        return; // decodeMessage accepts only broker commands
    }
  }

  private onWelcome(w: WelcomeBody): void {
    this._terms = {
      encoding: w.encoding,
      heartbeatMs: w.heartbeat_ms,
      liveness: w.heartbeat_liveness,
      maxMessageBytes: w.max_message_bytes,
      maxBatch: w.max_batch,
    };
    const first = this.brokerId === undefined;
    this.brokerId = w.broker_id;
    this.setState(LinkStates.WELCOMED);
    this.backoffMs = this.opts.reconnectInitialMs;
    this.goodbyeSent = false; // a new session hears the goodbye again
    this.log.info(
      {
        broker_id: w.broker_id,
        encoding: w.encoding,
        heartbeat_ms: w.heartbeat_ms,
        adopted: w.adopted.length,
      },
      `${first ? "welcomed" : "welcomed again"} by broker ${w.broker_id} at ${this.endpoint}`,
    );
    this.opts.owner.onWelcome(this, w);
    this.scheduleFlush();
    this.scheduleTick();
  }

  private onError(e: ErrorBody): void {
    switch (e.code) {
      case "hello_required":
        // The broker restarted and does not know us: keep the socket, say HELLO
        // (once: later hello_required answers to messages sent before it are ignored).
        if (this._state === LinkStates.WELCOMED) {
          this.log.warn(`broker at ${this.endpoint} asks for HELLO (did it restart?)`);
          this.sayHello();
        }
        return;
      case "hello_rejected":
      case "identity_mismatch":
      case "session_mismatch":
        this.log.error(`broker at ${this.endpoint} rejected HELLO: ${e.message}`);
        this.opts.owner.onHelloRejected(this, e);
        return; // HELLO is tried again after heartbeat × liveness, on a fresh socket
      case "shutting_down":
        return this.reconnect("broker is shutting down");
      default:
        this.log.warn(
          {
            code: e.code,
            command: e.command,
            attempt_id: e.attempt_id,
            schema_path: e.schema_path,
            instance_path: e.instance_path,
          },
          `broker reported ${e.code}${e.command ? ` for ${e.command}` : ""}: ${e.message}`,
        );
    }
  }
}
