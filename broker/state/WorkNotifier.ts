/**
 * Work notifications: a change that may make work (a task created, steps
 * retried or resolved) wakes this process's listeners directly once it has
 * committed, and every other process's by NOTIFY on the schema's channel.
 */
import { randomUUID } from "node:crypto";
import { coerceError } from "../db/errors";
import { type ChannelSubscription, listenToAll } from "./workListener";
import type { StateSql } from "./StateSql";
import { isJsonObject } from "./rows";
import type { WorkNotification } from "./types";

export class WorkNotifier {
  /** NOTIFY channel for work created by any process (per schema; at most 63 characters). */
  readonly workChannel: string;
  /**
   * Names this state manager in the notifications it sends, so that its own
   * listeners skip them: they are woken directly once the change has committed
   * (see wakeLocal), a round trip sooner, and exactly once.
   */
  private readonly origin = randomUUID();
  private readonly localListeners = new Set<(notification: WorkNotification) => void>();
  constructor(private readonly sql: StateSql) {
    this.workChannel = `work_${sql.db.schema}`.slice(0, 63);
  }

  /**
   * Calls `callback` whenever any process creates a task, retries or resolves
   * steps, so a broker picks up work it did not create. Changes made through
   * this state manager call it directly once committed; those of other
   * processes (and other state managers) arrive by NOTIFY on one dedicated
   * connection, which is reopened if it drops (then `reconnected` says that
   * some may have been missed). The returned function stops listening and
   * closes it.
   */
  listenForWork(callback: (notification: WorkNotification) => void): Promise<() => Promise<void>> {
    return listenToAll([this.subscription(callback)], {
      newClient: () => this.sql.db.newClient(),
      logger: this.sql.logger,
    });
  }

  /** listenForWork's part, for a connection shared with other channels (see listenToAll). */
  subscription(callback: (notification: WorkNotification) => void): ChannelSubscription {
    return {
      channel: this.workChannel,
      onNotification: (payload) => {
        let notification: WorkNotification = { reason: "created" };
        try {
          const parsed: unknown = JSON.parse(payload ?? "{}");
          // Our own change: the listeners were called when it committed.
          if (isJsonObject(parsed) && parsed.origin === this.origin) return;
          if (
            isJsonObject(parsed) &&
            (parsed.reason === "created" || parsed.reason === "retried" || parsed.reason === "resolved")
          ) {
            notification = { reason: parsed.reason };
          }
        } catch {
          // an unexpected payload still means "there may be work"
        }
        this.callListener(callback, notification);
      },
      onReconnect: () => this.callListener(callback, { reason: "reconnected" }),
      attach: () => this.localListeners.add(callback),
      detach: () => this.localListeners.delete(callback),
    };
  }

  /** The NOTIFY payload of a change made here: its reason, and this state manager's origin. */
  payload(reason: WorkNotification["reason"]): string {
    return JSON.stringify({ reason, origin: this.origin });
  }

  /** Tells this process's listeners about a change that has just committed. */
  wakeLocal(notification: WorkNotification): void {
    for (const callback of this.localListeners) this.callListener(callback, notification);
  }

  private callListener(
    callback: (notification: WorkNotification) => void,
    notification: WorkNotification,
  ): void {
    try {
      callback(notification);
    } catch (thrown) {
      this.sql.logger.error({ err: coerceError(thrown) }, "work listener callback threw");
    }
  }
}
