/**
 * The statement that copies one real finished task into a history of many
 * (./claims.ts builds its ten million finished steps with it), written at run
 * time from the catalog so that it follows the migrations without edits:
 * every table holding rows of the model task, every column an INSERT may
 * name, new ids and shifted timestamps. ./createDailyPartitions.ts makes the
 * partitions the copies' days need.
 */
import pg from "pg";

/** The copies' creation times spread over this many days before the build started. */
export const HISTORY_DAYS = 30;

export interface CopiedTable {
  name: string;
  /** Which rows of the source are the model's. */
  rows: "the task" | "by task_id" | "by step_id";
  columns: { name: string; type: string }[];
}

/**
 * The tables holding rows of a task, read from the catalog: tasks itself, and every table (a
 * partitioned parent, never one of its partitions) with a task_id or step_id column. Identity and
 * generated columns are left to the target, as an INSERT must.
 */
export async function copiedTables(c: pg.Client, schema: string): Promise<CopiedTable[]> {
  const { rows } = await c.query<{ table: string; column: string; type: string }>(
    `select cl.relname as table, a.attname as column, format_type(a.atttypid, a.atttypmod) as type
     from pg_class cl
     join pg_namespace n on n.oid = cl.relnamespace
     join pg_attribute a on a.attrelid = cl.oid and a.attnum > 0 and not a.attisdropped
     where n.nspname = $1 and cl.relkind in ('r', 'p') and not cl.relispartition
       and a.attidentity = '' and a.attgenerated = ''
     order by cl.relname, a.attnum`,
    [schema],
  );
  const byTable = new Map<string, { name: string; type: string }[]>();
  for (const r of rows)
    byTable.set(r.table, [...(byTable.get(r.table) ?? []), { name: r.column, type: r.type }]);
  const tables: CopiedTable[] = [];
  for (const [name, columns] of byTable) {
    const has = (col: string) => columns.some((c) => c.name === col);
    const rowsOf: CopiedTable["rows"] | undefined =
      name === "tasks"
        ? "the task"
        : has("task_id")
          ? "by task_id"
          : has("step_id")
            ? "by step_id"
            : undefined;
    if (rowsOf !== undefined) tables.push({ name, rows: rowsOf, columns });
  }
  // parents before children, for the foreign keys that remain (steps -> tasks)
  const rank = (t: CopiedTable) => (t.name === "tasks" ? 0 : t.name === "steps" ? 1 : 2);
  return tables.sort((a, b) => rank(a) - rank(b) || a.name.localeCompare(b.name));
}

/** What a copy puts in one column of a model row `m`, given the copy's ids and time shift in `g`. */
function copiedValue(table: string, column: { name: string; type: string }): string {
  const col = `m.${pg.escapeIdentifier(column.name)}`;
  if (column.name === "id" && table === "tasks") return "g.task_id";
  if (column.name === "id" && table === "steps") return "g.step_id";
  if (column.name === "task_id") return "g.task_id";
  if (column.name === "step_id") return "g.step_id";
  // a one-step, one-attempt model: every attempt id it mentions is that one attempt's
  if (column.name.endsWith("attempt_id")) return `case when ${col} is not null then g.attempt_id end`;
  if (column.name === "template_id") return "$4::int";
  if (column.name === "idempotency_key") return "null";
  if (column.name === "id" && column.type === "uuid") return "gen_random_uuid()";
  if (column.type === "timestamp with time zone") return `${col} + g.shift`;
  return col;
}

/**
 * One statement that writes copies $2..$3 of the model task $1 into `target` (one CTE per table),
 * their creation times spread evenly over HISTORY_DAYS before the anchor $5, out of `total` copies.
 */
export function copyStatement(
  source: string,
  target: string,
  tables: CopiedTable[],
  total: number,
  timeOrderedIds: boolean,
): string {
  const span = `(interval '${HISTORY_DAYS} days' / ${Math.max(total, 1)})`;
  // ids as the broker makes them (new_id(): time-ordered), at the copy's own time where the server can
  const id = timeOrderedIds ? "uuidv7(at - now())" : "gen_random_uuid()";
  const sourceTable = (t: string) => `${source}.${pg.escapeIdentifier(t)}`;
  const ctes = tables.map((t, i) => {
    const cols = t.columns.map((c) => pg.escapeIdentifier(c.name)).join(", ");
    const values = t.columns.map((c) => copiedValue(t.name, c)).join(", ");
    const where =
      t.rows === "the task"
        ? "m.id = $1::uuid"
        : t.rows === "by task_id"
          ? "m.task_id = $1::uuid"
          : `m.step_id in (select id from ${sourceTable("steps")} where task_id = $1::uuid)`;
    return (
      `c${i} as (insert into ${target}.${pg.escapeIdentifier(t.name)} (${cols}) ` +
      `select ${values} from g cross join ${sourceTable(t.name)} m where ${where})`
    );
  });
  return `
with times as (
  select i, $5::timestamptz - interval '${HISTORY_DAYS} days' + i * ${span} as at
  from generate_series($2::int, $3::int) as i
),
g as (
  select i, ${id} as task_id, ${id} as step_id, ${id} as attempt_id,
         at - (select created_at from ${sourceTable("tasks")} where id = $1::uuid) as shift
  from times
),
${ctes.join(",\n")}
select 1`;
}
