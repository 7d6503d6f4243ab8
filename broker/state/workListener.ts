/**
 * A LISTEN connection that outlives its connection. Work other processes
 * create reaches this one only by NOTIFY; when the listening connection drops
 * (a PostgreSQL restart, a failover, an idle-connection killer), this opens a
 * new one, with a growing delay while the database is away, and then reports
 * the reconnect, since notifications sent meanwhile are gone for good. Until
 * then that work waits for the broker's poll: late, never lost.
 *
 * One connection may listen on several channels (work and broker events), so
 * a broker holds one LISTEN connection, not one per kind of notification.
 */
import type pg from "pg";
import { coerceError } from "../db/errors";
import { quoteIdentifier } from "../db/identifiers";
import type { Logger } from "../db/logger";

export interface WorkListenerOptions {
  /** A new, unconnected client on the right schema. */
  newClient(): pg.Client;
  /** The channels: plain SQL identifiers (each is checked before it meets SQL). */
  channels: readonly string[];
  logger: Logger;
  /** A notification on one of the channels; processId is the backend that sent it (pg_backend_pid()). */
  onNotification(channel: string, payload: string | undefined, processId: number): void;
  /** Called once each time listening resumes after a loss. */
  onReconnect(): void;
  /** First delay before a reconnect; it doubles on each failure up to maxRetryMs. */
  minRetryMs?: number;
  maxRetryMs?: number;
}

/** Listens until the returned function is called. The first connect's failure is thrown to the caller. */
export async function listenReconnecting(opts: WorkListenerOptions): Promise<() => Promise<void>> {
  const minRetryMs = opts.minRetryMs ?? 250;
  const maxRetryMs = opts.maxRetryMs ?? 5000;
  let stopped = false;
  let current: pg.Client | undefined;
  let retryTimer: NodeJS.Timeout | undefined;
  let delayMs = minRetryMs;
  const channels = new Set(opts.channels);
  const channelSql = [...channels].map((c) => quoteIdentifier(c, "notification channel"));
  if (channelSql.length === 0) throw new Error("listenReconnecting needs at least one channel");

  const connect = async (): Promise<pg.Client> => {
    const client = opts.newClient();
    client.on("notification", (message) => {
      if (channels.has(message.channel))
        opts.onNotification(message.channel, message.payload, message.processId);
    });
    // pg emits "error" for a connection lost while idle, then "end"; either one means this client is done.
    client.on("error", (err) => lost(client, err));
    client.on("end", () => lost(client));
    try {
      await client.connect();
      for (const c of channelSql) await client.query(`listen ${c}`);
    } catch (err) {
      client.removeAllListeners("end");
      client.on("error", () => undefined);
      await client.end().catch(() => undefined);
      throw err;
    }
    return client;
  };

  const lost = (client: pg.Client, err?: Error): void => {
    if (stopped || current !== client) return;
    current = undefined;
    opts.logger.warn(
      { err: err === undefined ? undefined : coerceError(err), retryInMs: delayMs },
      "notification listener connection lost; reconnecting (other processes' work, cancels and finished tasks wait for the poll meanwhile)",
    );
    client.end().catch(() => undefined);
    scheduleReconnect();
  };

  const scheduleReconnect = (): void => {
    retryTimer = setTimeout(() => {
      retryTimer = undefined;
      if (stopped) return;
      connect().then(
        async (client) => {
          if (stopped) {
            await client.end().catch(() => undefined);
            return;
          }
          current = client;
          delayMs = minRetryMs;
          opts.logger.info({ channels: [...channels] }, "notification listener reconnected");
          opts.onReconnect();
        },
        (err: unknown) => {
          delayMs = Math.min(delayMs * 2, maxRetryMs);
          opts.logger.warn(
            { err: coerceError(err), retryInMs: delayMs },
            "notification listener could not reconnect; check that PostgreSQL is reachable. Retrying",
          );
          scheduleReconnect();
        },
      );
    }, delayMs);
    // A pending reconnect alone must not keep the process alive.
    retryTimer.unref();
  };

  current = await connect();
  return async () => {
    if (stopped) return;
    stopped = true;
    if (retryTimer !== undefined) clearTimeout(retryTimer);
    const client = current;
    current = undefined;
    if (client === undefined) return;
    await client.query("unlisten *").catch(() => undefined);
    await client.end().catch(() => undefined);
  };
}

/**
 * One kind of notification on one channel: how its NOTIFYs are handled, and
 * how its same-process listener is registered for the changes this process
 * makes (those are delivered directly, not by NOTIFY).
 */
export interface ChannelSubscription {
  channel: string;
  onNotification(payload: string | undefined, processId: number): void;
  onReconnect(): void;
  /** Listening has started: register for this process's own changes. */
  attach(): void;
  /** Listening stops: unregister. */
  detach(): void;
}

/**
 * Listens to several subscriptions on ONE connection (a broker needs work and
 * events: one connection, not two), until the returned function is called.
 */
export async function listenToAll(
  subscriptions: ChannelSubscription[],
  options: { newClient(): pg.Client; logger: Logger },
): Promise<() => Promise<void>> {
  const byChannel = new Map<string, ChannelSubscription[]>();
  for (const sub of subscriptions) byChannel.set(sub.channel, [...(byChannel.get(sub.channel) ?? []), sub]);
  const stop = await listenReconnecting({
    newClient: options.newClient,
    channels: [...byChannel.keys()],
    logger: options.logger,
    onNotification: (channel, payload, processId) => {
      for (const sub of byChannel.get(channel) ?? []) sub.onNotification(payload, processId);
    },
    onReconnect: () => {
      for (const sub of subscriptions) sub.onReconnect();
    },
  });
  for (const sub of subscriptions) sub.attach();
  return async () => {
    for (const sub of subscriptions) sub.detach();
    await stop();
  };
}
