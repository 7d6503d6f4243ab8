/**
 * Daily range partitions for a span of days, on every range-partitioned table
 * of a schema that has none covering a day yet: what the claims benchmark's
 * history needs when its copies spread over 30 days (the broker creates its
 * partitions ahead; a bench history reaches back before the broker existed).
 */
import pg from "pg";

/**
 * Daily partitions for [from, to) on every range-partitioned table of `schema`, where no partition
 * covers the day yet: each is tried in a savepoint, and a day another partition (or a default one
 * already holding rows of it) covers is left as it is. Returns how many were created.
 */
export async function createDailyPartitions(
  c: pg.Client,
  schema: string,
  from: Date,
  to: Date,
): Promise<number> {
  const { rows: parents } = await c.query<{ name: string }>(
    `select cl.relname as name from pg_partitioned_table p
     join pg_class cl on cl.oid = p.partrelid join pg_namespace n on n.oid = cl.relnamespace
     where n.nspname = $1 and p.partstrat = 'r' and p.partnatts = 1`,
    [schema],
  );
  let created = 0;
  await c.query("begin");
  try {
    for (const { name } of parents) {
      for (let day = new Date(from); day < to; day = new Date(day.getTime() + 86_400_000)) {
        const next = new Date(day.getTime() + 86_400_000);
        const partition = `${name}_p${day.toISOString().slice(0, 10).replaceAll("-", "")}`;
        await c.query("savepoint day");
        try {
          await c.query(
            `create table ${schema}.${pg.escapeIdentifier(partition)} partition of ${schema}.${pg.escapeIdentifier(name)} ` +
              `for values from ('${day.toISOString()}') to ('${next.toISOString()}')`,
          );
          created++;
        } catch {
          await c.query("rollback to savepoint day");
        }
      }
    }
    await c.query("commit");
  } catch (err) {
    await c.query("rollback").catch(() => undefined);
    throw err;
  }
  return created;
}

/**
 * As if `schema` had been migrated before `before`: each history table's `_legacy` partition (0013
 * makes it run to the UTC midnight after the migration) is detached and attached again ending at
 * `before`. A bench history is backdated into days before its schema was migrated; with the bound
 * as 0013 leaves it, every copy would land in `_legacy` and the claims would insert beside all of
 * them, where a real history written day by day lies in its day partitions. Only an empty
 * `_legacy` may move (an ATTACH would refuse rows outside the new bound anyway); returns how many did.
 */
export async function boundLegacyPartitions(c: pg.Client, schema: string, before: Date): Promise<number> {
  const { rows } = await c.query<{ parent: string; legacy: string }>(
    `select p.relname as parent, cl.relname as legacy from pg_inherits i
     join pg_class cl on cl.oid = i.inhrelid join pg_class p on p.oid = i.inhparent
     join pg_namespace n on n.oid = cl.relnamespace
     where n.nspname = $1 and cl.relname = p.relname || '_legacy'`,
    [schema],
  );
  let moved = 0;
  await c.query("begin");
  try {
    for (const { parent, legacy } of rows) {
      const table = `${schema}.${pg.escapeIdentifier(legacy)}`;
      const held = await c.query(`select 1 from ${table} limit 1`);
      if (held.rowCount !== 0) continue;
      await c.query(`alter table ${schema}.${pg.escapeIdentifier(parent)} detach partition ${table}`);
      await c.query(
        `alter table ${schema}.${pg.escapeIdentifier(parent)} attach partition ${table} ` +
          `for values from (minvalue) to ('${before.toISOString()}')`,
      );
      moved++;
    }
    await c.query("commit");
  } catch (err) {
    await c.query("rollback").catch(() => undefined);
    throw err;
  }
  return moved;
}

export function startOfDay(t: Date, days = 0): Date {
  const d = new Date(t);
  d.setUTCHours(0, 0, 0, 0);
  d.setUTCDate(d.getUTCDate() + days);
  return d;
}
