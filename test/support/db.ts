/**
 * One schema per test file: `useStateManager("claims")` registers before/after
 * hooks that create a fresh schema (migrated), hand out a StateManager on it,
 * and drop the schema with everything in it at the end, so nothing leaks and
 * files can run side by side against one server.
 */
import { randomBytes } from "node:crypto";
import pg from "pg";
import { quoteIdentifier } from "../../broker/db/identifiers";
import { type Database, openDatabase } from "../../broker/db/openDatabase";
import { StateManager } from "../../broker/state/StateManager";

export function databaseUrl(): string {
  const url = process.env.DATABASE_URL;
  if (url === undefined || url === "") {
    throw new Error(
      "DATABASE_URL is not set: run mocha with --require test/support/global.ts (or set DATABASE_URL)",
    );
  }
  return url;
}

/**
 * A superuser URL of the same server, when the test run has one (the embedded
 * server of test/support/global.ts). DATABASE_URL is not a superuser there.
 */
export function adminDatabaseUrl(): string | undefined {
  const url = process.env.DATABASE_ADMIN_URL;
  return url === undefined || url === "" ? undefined : url;
}

/** A fresh schema name, unique per call: t_<label>_<random>. */
export function uniqueSchemaName(label: string): string {
  const clean = label
    .toLowerCase()
    .replace(/[^a-z0-9_]/g, "_")
    .slice(0, 30);
  return `t_${clean}_${randomBytes(4).toString("hex")}`;
}

/** Drops a schema and everything in it, through a connection of its own. */
export async function dropSchema(schema: string): Promise<void> {
  const client = new pg.Client({ connectionString: databaseUrl() });
  await client.connect();
  try {
    await client.query(`drop schema if exists ${quoteIdentifier(schema, "schema")} cascade`);
  } finally {
    await client.end();
  }
}

export interface TestState {
  readonly sm: StateManager;
  readonly db: Database;
  readonly schema: string;
  /** A query on the test schema (for assertions on the tables themselves). */
  sql<R extends pg.QueryResultRow>(text: string, values?: unknown[]): Promise<R[]>;
}

/** Registers hooks giving the current describe() block its own migrated schema. */
export function useStateManager(label: string): TestState {
  let sm: StateManager | undefined;
  const schema = uniqueSchemaName(label);
  before(async function () {
    this.timeout(30_000);
    const db = await openDatabase({ databaseUrl: databaseUrl(), schema, poolSize: 20 });
    sm = new StateManager(db);
    await sm.migrate();
  });
  after(async function () {
    this.timeout(30_000);
    try {
      await sm?.close();
    } finally {
      await dropSchema(schema);
    }
  });
  const get = (): StateManager => {
    if (sm === undefined)
      throw new Error("the state manager is only available inside tests (after the before hook)");
    return sm;
  };
  return {
    get sm() {
      return get();
    },
    get db() {
      return get().db;
    },
    schema,
    async sql<R extends pg.QueryResultRow>(text: string, values: unknown[] = []): Promise<R[]> {
      return (await get().db.pool.query<R>(text, values)).rows;
    },
  };
}
