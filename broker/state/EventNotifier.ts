/**
 * Broker events: what brokers sharing one database must tell each other, by
 * NOTIFY on the schema's events channel, sent in the transaction that makes
 * the change (so an event is never announced for a change that rolled back):
 * a cancel names the attempts that lost their lease and the broker whose pool
 * runs each (broker A cancels a task whose step runs under broker B), and a
 * finished event names a task that reached a terminal state (a WAIT on A for a
 * task finished under B answers at once). finalize_tasks() in sql/functions
 * sends the finished events of every path that ends a task through it; this
 * file sends the rest.
 *
 * This process's own changes reach its listeners directly once committed (a
 * round trip sooner); the NOTIFYs its own connections sent are recognised by
 * their backend pid and skipped, so each listener sees each event once. State
 * managers sharing one connection pool share that, so they hear each other's
 * events directly too.
 */
import type pg from "pg";
import type { CancelReason, TaskState } from "../../protocol/constants";
import { CancelReasons, TaskStates } from "../../protocol/constants";
import { coerceError } from "../db/errors";
import type { StateSql } from "./StateSql";
import { type ChannelSubscription, listenToAll } from "./workListener";
import { isJsonObject } from "./rows";
import type { BrokerEvent, EventAttempt, FinishedTask } from "./types";

/** PostgreSQL refuses a NOTIFY payload of 8000 bytes or more; each payload stays under this. */
export const MAX_EVENT_PAYLOAD_BYTES = 7900;

const CANCEL_REASONS = new Set<string>(Object.values(CancelReasons));
const TASK_STATES = new Set<string>(Object.values(TaskStates));

/** The backend pid of a pooled connection (pg sets it from BackendKeyData; its typings omit it). */
function backendPid(client: pg.PoolClient): number | undefined {
  const pid = (client as unknown as { processID?: unknown }).processID;
  return typeof pid === "number" ? pid : undefined;
}

/**
 * Joins JSON items into as few payloads as fit under the limit:
 * `${head}[item,item,…]}`. An item that cannot fit alone is dropped and logged.
 */
function packPayloads(head: string, items: string[], onTooBig: (item: string) => void): string[] {
  const payloads: string[] = [];
  const fixed = Buffer.byteLength(head) + 2; // "[" and "]}"
  let batch: string[] = [];
  let bytes = fixed;
  for (const item of items) {
    const size = Buffer.byteLength(item) + 1;
    if (fixed + size > MAX_EVENT_PAYLOAD_BYTES) {
      onTooBig(item);
      continue;
    }
    if (bytes + size > MAX_EVENT_PAYLOAD_BYTES) {
      payloads.push(`${head}[${batch.join(",")}]}`);
      batch = [];
      bytes = fixed;
    }
    batch.push(item);
    bytes += size;
  }
  if (batch.length > 0) payloads.push(`${head}[${batch.join(",")}]}`);
  return payloads;
}

/** NOTIFY payloads announcing that these attempts lost their lease; `reason` is the CANCEL reason their pools get. */
export function cancelEventPayloads(
  reason: CancelReason,
  attempts: EventAttempt[],
  onTooBig: (item: string) => void = () => undefined,
): string[] {
  return packPayloads(
    `{"kind":"cancel","reason":${JSON.stringify(reason)},"attempts":`,
    attempts.map((a) => JSON.stringify([a.attemptId, a.taskId, a.brokerId])),
    onTooBig,
  );
}

/** NOTIFY payloads announcing that these tasks finished (the shape finalize_tasks() sends). */
export function finishedEventPayloads(tasks: { taskId: string; state: TaskState }[]): string[] {
  return packPayloads(
    `{"kind":"finished","tasks":`,
    tasks.map((t) => JSON.stringify({ task_id: t.taskId, state: t.state })),
    () => undefined,
  );
}

/** The events one NOTIFY payload carries; [] for a payload that is not a well-formed event. */
export function parseEventPayload(payload: string | undefined): BrokerEvent[] {
  let parsed: unknown;
  try {
    parsed = JSON.parse(payload ?? "");
  } catch {
    return [];
  }
  if (!isJsonObject(parsed)) return [];
  if (parsed.kind === "finished" && Array.isArray(parsed.tasks)) {
    const events: BrokerEvent[] = [];
    for (const t of parsed.tasks) {
      if (!isJsonObject(t) || typeof t.task_id !== "string" || typeof t.state !== "string") continue;
      if (!TASK_STATES.has(t.state)) continue;
      events.push({ kind: "finished", taskId: t.task_id, state: t.state as TaskState });
    }
    return events;
  }
  if (
    parsed.kind === "cancel" &&
    typeof parsed.reason === "string" &&
    CANCEL_REASONS.has(parsed.reason) &&
    Array.isArray(parsed.attempts)
  ) {
    const attempts: EventAttempt[] = [];
    for (const a of parsed.attempts) {
      if (!Array.isArray(a)) continue;
      const [attemptId, taskId, brokerId] = a as unknown[];
      if (typeof attemptId !== "string" || typeof taskId !== "string" || typeof brokerId !== "string")
        continue;
      attempts.push({ attemptId, taskId, brokerId });
    }
    return attempts.length === 0 ? [] : [{ kind: "cancel", reason: parsed.reason as CancelReason, attempts }];
  }
  return [];
}

/** What the state managers of one connection pool share: its backends' pids, and their listeners. */
interface PoolBus {
  /** Backend pids of the pool's connections: the NOTIFYs they send are ours. */
  readonly ownBackends: Set<number>;
  readonly listeners: Set<(event: BrokerEvent) => void>;
}

const buses = new WeakMap<pg.Pool, PoolBus>();

function busOf(pool: pg.Pool): PoolBus {
  let bus = buses.get(pool);
  if (bus !== undefined) return bus;
  const created: PoolBus = { ownBackends: new Set(), listeners: new Set() };
  // Connections made before this (none, when the state manager is built right after
  // openDatabase) are unknown: their events would reach local listeners twice, never zero times.
  pool.on("connect", (client) => {
    const pid = backendPid(client);
    if (pid !== undefined) created.ownBackends.add(pid);
  });
  pool.on("remove", (client) => {
    const pid = backendPid(client);
    if (pid !== undefined) created.ownBackends.delete(pid);
  });
  buses.set(pool, created);
  bus = created;
  return bus;
}

export class EventNotifier {
  /** NOTIFY channel of broker events (per schema; at most 63 characters; finalize_tasks() computes the same name). */
  readonly eventsChannel: string;
  private readonly bus: PoolBus;

  constructor(private readonly sql: StateSql) {
    this.eventsChannel = `events_${sql.db.schema}`.slice(0, 63);
    this.bus = busOf(sql.db.pool);
  }

  /**
   * Calls `callback` with every broker event (see BrokerEvent), from this
   * state manager (directly, once committed) and from every other process on
   * the database (NOTIFY, on one dedicated connection reopened if it drops;
   * then `reconnected` says some may have been missed). The returned function
   * stops listening and closes that connection.
   */
  listenForEvents(callback: (event: BrokerEvent) => void): Promise<() => Promise<void>> {
    return listenToAll([this.subscription(callback)], {
      newClient: () => this.sql.db.newClient(),
      logger: this.sql.logger,
    });
  }

  /** listenForEvents's part, for a connection shared with other channels (see listenToAll). */
  subscription(callback: (event: BrokerEvent) => void): ChannelSubscription {
    return {
      channel: this.eventsChannel,
      onNotification: (payload, processId) => {
        // Our own change: the listeners were called when it committed.
        if (this.bus.ownBackends.has(processId)) return;
        const events = parseEventPayload(payload);
        if (events.length === 0) {
          this.sql.logger.warn(
            { channel: this.eventsChannel, bytes: payload?.length ?? 0 },
            "ignored a malformed broker event; is a process of another stepbroker version NOTIFYing this channel?",
          );
        }
        for (const event of events) this.callListener(callback, event);
      },
      onReconnect: () => this.callListener(callback, { kind: "reconnected" }),
      attach: () => this.bus.listeners.add(callback),
      detach: () => this.bus.listeners.delete(callback),
    };
  }

  /** Payloads announcing that these attempts lost their lease (see cancelEventPayloads). */
  cancelPayloads(reason: CancelReason, attempts: EventAttempt[]): string[] {
    return cancelEventPayloads(reason, attempts, (item) =>
      this.sql.logger.warn(
        { bytes: item.length },
        "a cancelled attempt's broker id is too long for a NOTIFY; that broker cancels it when its lease is refused",
      ),
    );
  }

  /** Payloads announcing that these tasks finished. */
  finishedPayloads(tasks: { taskId: string; state: TaskState }[]): string[] {
    return finishedEventPayloads(tasks);
  }

  /** Sends payloads in the caller's transaction: other processes get them only if it commits. */
  async send(client: pg.PoolClient, payloads: string[]): Promise<void> {
    if (payloads.length === 0) return;
    await this.sql.runIn(client, "notify_events", [this.eventsChannel, payloads]);
  }

  /** Tells this process's listeners about events of a change that has just committed. */
  wakeLocal(events: BrokerEvent[]): void {
    if (this.bus.listeners.size === 0) return;
    for (const event of events) {
      for (const callback of this.bus.listeners) this.callListener(callback, event);
    }
  }

  /** wakeLocal for tasks a committed change finished. */
  wakeFinished(tasks: FinishedTask[]): void {
    this.wakeLocal(tasks.map((t) => ({ kind: "finished", taskId: t.taskId, state: t.state })));
  }

  private callListener(callback: (event: BrokerEvent) => void, event: BrokerEvent): void {
    try {
      callback(event);
    } catch (thrown) {
      this.sql.logger.error({ err: coerceError(thrown) }, "broker event listener callback threw");
    }
  }
}
