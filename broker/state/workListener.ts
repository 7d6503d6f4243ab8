/**
 * A LISTEN connection that outlives its connection. Work other processes
 * create reaches this one only by NOTIFY; when the listening connection drops
 * (a PostgreSQL restart, a failover, an idle-connection killer), this opens a
 * new one, with a growing delay while the database is away, and then reports
 * the reconnect, since notifications sent meanwhile are gone for good. Until
 * then that work waits for the broker's poll: late, never lost.
 */
import type pg from "pg";
import { coerceError } from "../db/errors";
import { quoteIdentifier } from "../db/identifiers";
import type { Logger } from "../db/logger";

export interface WorkListenerOptions {
  /** A new, unconnected client on the right schema. */
  newClient(): pg.Client;
  /** The channel: a plain SQL identifier (it is checked before it meets SQL). */
  channel: string;
  logger: Logger;
  onPayload(payload: string | undefined): void;
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
  const channelSql = quoteIdentifier(opts.channel, "work channel");

  const connect = async (): Promise<pg.Client> => {
    const client = opts.newClient();
    client.on("notification", (message) => {
      if (message.channel === opts.channel) opts.onPayload(message.payload);
    });
    // pg emits "error" for a connection lost while idle, then "end"; either one means this client is done.
    client.on("error", (err) => lost(client, err));
    client.on("end", () => lost(client));
    try {
      await client.connect();
      await client.query(`listen ${channelSql}`);
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
      "work listener connection lost; reconnecting (other processes' new work waits for the poll meanwhile)",
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
          opts.logger.info({ channel: opts.channel }, "work listener reconnected");
          opts.onReconnect();
        },
        (err: unknown) => {
          delayMs = Math.min(delayMs * 2, maxRetryMs);
          opts.logger.warn(
            { err: coerceError(err), retryInMs: delayMs },
            "work listener could not reconnect; check that PostgreSQL is reachable. Retrying",
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
    await client.query(`unlisten ${channelSql}`).catch(() => undefined);
    await client.end().catch(() => undefined);
  };
}
