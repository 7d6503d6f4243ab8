/**
 * How every part of the state manager talks to PostgreSQL: the named
 * statements of sql/queries/ (prepared once per connection), transactions that
 * are retried on deadlock, and finalizing tasks inside one.
 */
import type pg from "pg";
import type { Logger } from "../db/logger";
import type { Database } from "../db/openDatabase";
import { type Query, type QueryName, loadQueries } from "../db/queries";
import { runStatement, withTransaction } from "../db/transaction";
import { StateError } from "./errors";
import { TemplateError } from "./templates";
import { type FinalizeRow } from "./rows";
import type { FinishedTask } from "./types";

export class StateSql {
  readonly db: Database;
  readonly logger: Logger;
  private readonly queries: Readonly<Record<QueryName, Query>>;
  constructor(db: Database, logger: Logger) {
    this.db = db;
    this.logger = logger;
    this.queries = loadQueries();
  }

  private statement(name: QueryName, values: unknown[]): pg.QueryConfig {
    const q = this.queries[name];
    return { name: q.name, text: q.text, values };
  }

  async run<R extends pg.QueryResultRow>(name: QueryName, values: unknown[]): Promise<R[]> {
    return (await runStatement<R>(this.db.pool, name, this.statement(name, values))).rows;
  }

  /**
   * A statement whose rows come as arrays, in the order of its select list: for the hot
   * queries, where pg's row objects (a spread of a prebuilt object, then a keyed store per
   * column) were a visible part of the broker's CPU per step, and were copied again anyway.
   */
  async runTuples<R extends unknown[]>(name: QueryName, values: unknown[]): Promise<R[]> {
    const statement: pg.QueryArrayConfig = { ...this.statement(name, values), rowMode: "array" };
    return (await runStatement<R>(this.db.pool, name, statement)).rows;
  }

  async runIn<R extends pg.QueryResultRow>(
    client: pg.PoolClient,
    name: QueryName,
    values: unknown[],
  ): Promise<R[]> {
    return (await client.query<R>(this.statement(name, values))).rows;
  }

  /** A transaction; a deliberate refusal (StateError, TemplateError) comes out as itself, not wrapped. */
  async transaction<T>(label: string, work: (client: pg.PoolClient) => Promise<T>): Promise<T> {
    try {
      return await withTransaction(this.db.pool, label, this.logger, work);
    } catch (err) {
      const cause = err instanceof Error ? err.cause : undefined;
      if (cause instanceof StateError || cause instanceof TemplateError) throw cause;
      throw err;
    }
  }

  async finalize(client: pg.PoolClient, taskIds: Iterable<string>): Promise<FinishedTask[]> {
    const ids = [...new Set(taskIds)];
    if (ids.length === 0) return [];
    const rows = await this.runIn<FinalizeRow>(client, "finalize_tasks", [ids]);
    return rows.map((r) => ({ taskId: r.task_id, state: r.state, error: r.error }));
  }
}
