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

export function startOfDay(t: Date, days = 0): Date {
  const d = new Date(t);
  d.setUTCHours(0, 0, 0, 0);
  d.setUTCDate(d.getUTCDate() + days);
  return d;
}
