/**
 * Applies the numbered, forward-only migrations in sql/migrations/ that the
 * ledger table `schema_migrations` does not list yet. Each one runs in its own
 * transaction holding a transaction-level advisory lock for the schema, and
 * re-reads the ledger under that lock: two processes migrating at once apply
 * each migration exactly once between them.
 *
 * Migrations hold tables, indexes, triggers and the `drop function` a
 * signature change needs. The live definition of every SQL function is a file
 * of its own in sql/functions/ (`create or replace`), applied after the
 * migrations in one more locked transaction whenever its checksum differs from
 * the one in `schema_functions`: a reader finds today's body in one place, not
 * in the last migration that happened to redefine it.
 */
import { createHash } from "node:crypto";
import { readdirSync, readFileSync } from "node:fs";
import type pg from "pg";
import { quoteIdentifier } from "./identifiers";
import { type Logger, silentLogger } from "./logger";

const MIGRATION_DIR = new URL("../../sql/migrations/", import.meta.url);
const MIGRATION_FILE = /^(\d{4})_[a-z0-9_]+\.sql$/;
const FUNCTION_DIR = new URL("../../sql/functions/", import.meta.url);
const FUNCTION_FILE = /^[a-z][a-z0-9_]*\.sql$/;

export interface Migration {
  /** File name without .sql, e.g. "0001_init". */
  readonly name: string;
  readonly sql: string;
  readonly checksum: string;
}

/** Every migration file, in order. Numbers must run 0001, 0002, … without gaps or repeats. */
export function listMigrations(): Migration[] {
  const files = readdirSync(MIGRATION_DIR)
    .filter((f) => f.endsWith(".sql"))
    .sort();
  return files.map((file, index) => {
    const match = MIGRATION_FILE.exec(file);
    if (match === null) throw new Error(`sql/migrations/${file}: name it NNNN_lowercase_words.sql`);
    if (Number(match[1]) !== index + 1) {
      throw new Error(
        `sql/migrations/${file}: expected number ${String(index + 1).padStart(4, "0")} (no gaps, no repeats)`,
      );
    }
    const sql = readFileSync(new URL(file, MIGRATION_DIR), "utf8");
    return { name: file.slice(0, -4), sql, checksum: sha256(sql) };
  });
}

function sha256(text: string): string {
  return createHash("sha256").update(text).digest("hex");
}

/** Every function definition in sql/functions/, by name; each file defines the function it is named after. */
export function listFunctions(): Migration[] {
  return readdirSync(FUNCTION_DIR)
    .filter((f) => f.endsWith(".sql"))
    .sort()
    .map((file) => {
      if (!FUNCTION_FILE.test(file)) throw new Error(`sql/functions/${file}: name it after its function`);
      const sql = readFileSync(new URL(file, FUNCTION_DIR), "utf8");
      const name = file.slice(0, -4);
      if (!new RegExp(`create or replace function ${name}\\(`).test(sql)) {
        throw new Error(`sql/functions/${file} must define ${name}() with create or replace function`);
      }
      return { name, sql, checksum: sha256(sql) };
    });
}

/** Both halves of the advisory lock key: one constant for stepbroker, one per schema. */
const LOCK_SQL = "select pg_advisory_xact_lock(hashtext('stepbroker.migrate'), hashtext($1))";

/**
 * Migrates `schema` through `client` (connected, search_path set to the schema,
 * not in a transaction). Returns the names of the migrations this call applied.
 */
export async function migrateSchema(
  client: pg.Client | pg.PoolClient,
  schema: string,
  logger: Logger = silentLogger,
): Promise<string[]> {
  const quoted = quoteIdentifier(schema, "schema");
  const migrations = listMigrations();
  const applied: string[] = [];

  async function inLockedTransaction<T>(label: string, work: () => Promise<T>): Promise<T> {
    await client.query("BEGIN");
    try {
      await client.query(LOCK_SQL, [schema]);
      const result = await work();
      await client.query("COMMIT");
      return result;
    } catch (thrown) {
      await client.query("ROLLBACK").catch(() => undefined);
      throw new Error(`migration ${label} of schema ${schema} failed`, { cause: thrown });
    }
  }

  await inLockedTransaction("setup", async () => {
    await client.query(`create schema if not exists ${quoted}`);
    await client.query(
      `create table if not exists ${quoted}.schema_migrations (
         name text primary key, checksum text not null, applied_at timestamptz not null default now())`,
    );
    await client.query(
      `create table if not exists ${quoted}.schema_functions (
         name text primary key, checksum text not null, applied_at timestamptz not null default now())`,
    );
  });

  for (const migration of migrations) {
    await inLockedTransaction(migration.name, async () => {
      const done = await client.query<{ checksum: string }>(
        `select checksum from ${quoted}.schema_migrations where name = $1`,
        [migration.name],
      );
      const row = done.rows[0];
      if (row !== undefined) {
        if (row.checksum !== migration.checksum) {
          logger.warn(
            { migration: migration.name, schema },
            "an applied migration file has changed since; migrations are forward-only, add a new one instead",
          );
        }
        return;
      }
      await client.query(migration.sql);
      await client.query(`insert into ${quoted}.schema_migrations (name, checksum) values ($1, $2)`, [
        migration.name,
        migration.checksum,
      ]);
      applied.push(migration.name);
      logger.info({ migration: migration.name, schema }, "applied migration");
    });
  }
  await inLockedTransaction("functions", async () => {
    const known = await client.query<{ name: string; checksum: string }>(
      `select name, checksum from ${quoted}.schema_functions`,
    );
    const current = new Map(known.rows.map((r) => [r.name, r.checksum]));
    for (const fn of listFunctions()) {
      if (current.get(fn.name) === fn.checksum) continue;
      await client.query(fn.sql);
      await client.query(
        `insert into ${quoted}.schema_functions (name, checksum) values ($1, $2)
         on conflict (name) do update set checksum = excluded.checksum, applied_at = now()`,
        [fn.name, fn.checksum],
      );
      logger.info({ function: fn.name, schema }, "applied function definition");
    }
  });
  return applied;
}
