/**
 * The claims benchmark's history copy (bench/copyStatement.ts,
 * bench/createDailyPartitions.ts) on tables shaped like the insert-only,
 * partitioned model (a history_seq counter, transitions and attempts
 * partitioned by time, an identity and a generated column), so it is known to
 * work before that model's migration lands; and measureClaims end to end on
 * the schema the migrations make today, thrown away and kept.
 */
import assert from "node:assert/strict";
import pg from "pg";
import { measureClaims } from "../../bench/claims";
import { HISTORY_DAYS, copiedTables, copyStatement } from "../../bench/copyStatement";
import { boundLegacyPartitions, createDailyPartitions, startOfDay } from "../../bench/createDailyPartitions";
import { openDatabase } from "../../broker/db/openDatabase";
import { StateManager } from "../../broker/state/StateManager";
import { databaseUrl, dropSchema, uniqueSchemaName } from "../support/db";

const DAY = 86_400_000;

/** The new model in miniature: what the copy must follow from the catalog alone. */
function ddl(schema: string): string {
  return `
create schema ${schema};
set search_path = ${schema};
create table task_templates (id integer primary key);
create table tasks (
  id uuid primary key, template_id integer not null references task_templates (id), state text not null,
  context jsonb not null, history_seq integer not null, idempotency_key text unique,
  created_at timestamptz not null, finished_at timestamptz);
create table steps (
  id uuid primary key, task_id uuid not null references tasks (id), name text not null, state text not null,
  history_seq integer not null, lease_attempt_id uuid,
  name_length integer generated always as (length(name)) stored,
  created_at timestamptz not null, finished_at timestamptz);
create table step_attempts (
  attempt_id uuid not null, step_id uuid not null, task_id uuid not null, started_at timestamptz not null,
  finished_at timestamptz not null, outcome text not null, primary key (attempt_id, finished_at)
) partition by range (finished_at);
create table step_attempts_default partition of step_attempts default;
create table step_transitions (
  step_id uuid not null, task_id uuid not null, to_state text not null, attempt_id uuid, sort_key integer not null,
  created_at timestamptz not null, primary key (step_id, sort_key, created_at)
) partition by range (created_at);
create table step_transitions_default partition of step_transitions default;
-- no default partition: a copy on a day without a partition fails here
create table task_transitions (
  seq bigint generated always as identity, task_id uuid not null, to_state text not null, sort_key integer not null,
  created_at timestamptz not null, primary key (task_id, sort_key, created_at)
) partition by range (created_at);
create table step_notes (step_id uuid not null, note text not null);
insert into task_templates values (7);`;
}

/** One finished one-step task, an hour ago, as the state manager would have left it. */
const MODEL = `
insert into tasks values ('00000000-0000-7000-8000-000000000001', 7, 'complete', '{"n": 1}', 3, 'key-1',
  now() - interval '1 hour', now() - interval '1 hour' + interval '2 seconds');
insert into steps (id, task_id, name, state, history_seq, lease_attempt_id, created_at, finished_at)
  values ('00000000-0000-7000-8000-000000000002', '00000000-0000-7000-8000-000000000001', 'work', 'complete', 3,
  null, now() - interval '1 hour', now() - interval '1 hour' + interval '2 seconds');
insert into step_attempts values ('00000000-0000-7000-8000-000000000003', '00000000-0000-7000-8000-000000000002',
  '00000000-0000-7000-8000-000000000001', now() - interval '1 hour' + interval '1 second',
  now() - interval '1 hour' + interval '2 seconds', 'complete');
insert into step_transitions values
  ('00000000-0000-7000-8000-000000000002', '00000000-0000-7000-8000-000000000001', 'ready', null, 1, now() - interval '1 hour'),
  ('00000000-0000-7000-8000-000000000002', '00000000-0000-7000-8000-000000000001', 'in_progress',
   '00000000-0000-7000-8000-000000000003', 2, now() - interval '1 hour' + interval '1 second'),
  ('00000000-0000-7000-8000-000000000002', '00000000-0000-7000-8000-000000000001', 'complete',
   '00000000-0000-7000-8000-000000000003', 3, now() - interval '1 hour' + interval '2 seconds');
insert into task_transitions (task_id, to_state, sort_key, created_at) values
  ('00000000-0000-7000-8000-000000000001', 'pending', 1, now() - interval '1 hour'),
  ('00000000-0000-7000-8000-000000000001', 'in_progress', 2, now() - interval '1 hour' + interval '1 second'),
  ('00000000-0000-7000-8000-000000000001', 'complete', 3, now() - interval '1 hour' + interval '2 seconds');
insert into step_notes values ('00000000-0000-7000-8000-000000000002', 'a row reached by step_id only');`;

const MODEL_TASK = "00000000-0000-7000-8000-000000000001";

describe("bench: the history copy", function () {
  this.timeout(60_000);
  const source = uniqueSchemaName("copy_source");
  const target = uniqueSchemaName("copy_target");
  let c: pg.Client;

  before(async () => {
    c = new pg.Client({ connectionString: databaseUrl() });
    await c.connect();
    await c.query(ddl(source));
    await c.query("create table task_transitions_default partition of task_transitions default");
    await c.query(MODEL);
    await c.query(ddl(target));
    await c.query("reset search_path");
  });

  after(async () => {
    await c?.end();
    await dropSchema(source);
    await dropSchema(target);
  });

  it("copies every row of the model task into daily partitions, with new ids and spread timestamps", async () => {
    const anchor = new Date();
    // a day some other partition already covers: left as it is, the days around it still made
    const taken = startOfDay(anchor, -10);
    await c.query(
      `create table ${target}.step_transitions_taken partition of ${target}.step_transitions
       for values from ('${taken.toISOString()}') to ('${new Date(taken.getTime() + DAY).toISOString()}')`,
    );
    const from = startOfDay(anchor, -HISTORY_DAYS - 1);
    const to = startOfDay(anchor, 2);
    const days = Math.round((to.getTime() - from.getTime()) / DAY);
    const created = await createDailyPartitions(c, target, from, to);
    assert.equal(created, 3 * days - 1, "a partition per day and range-partitioned table, but the day taken");
    assert.equal(await createDailyPartitions(c, target, from, to), 0, "a second call creates nothing");

    const tables = await copiedTables(c, target);
    assert.deepEqual(
      tables.map((t) => `${t.name}:${t.rows}`),
      [
        "tasks:the task",
        "steps:by task_id",
        "step_attempts:by task_id",
        "step_notes:by step_id",
        "step_transitions:by task_id",
        "task_transitions:by task_id",
      ],
    );
    const columns = (name: string) => tables.find((t) => t.name === name)!.columns.map((col) => col.name);
    assert.ok(!columns("steps").includes("name_length"), "a generated column is the target's to compute");
    assert.ok(!columns("task_transitions").includes("seq"), "an identity column is the target's to number");

    const { rows: version } = await c.query<{ v: number }>(
      "select current_setting('server_version_num')::int as v",
    );
    const sql = copyStatement(source, target, tables, 1000, (version[0]?.v ?? 0) >= 180000);
    await c.query(sql, [MODEL_TASK, 1, 600, 7, anchor]);
    await c.query(sql, [MODEL_TASK, 601, 1000, 7, anchor]);

    const count = async (from: string): Promise<number> =>
      Number((await c.query<{ n: string }>(`select count(*)::text as n from ${target}.${from}`)).rows[0]!.n);
    assert.equal(await count("tasks"), 1000);
    assert.equal(await count("steps"), 1000);
    assert.equal(await count("step_attempts"), 1000);
    assert.equal(await count("step_transitions"), 3000);
    assert.equal(await count("task_transitions"), 3000);
    assert.equal(await count("step_notes"), 1000);
    assert.equal(await count("step_transitions_default"), 0, "every transition in a daily partition");
    assert.equal(await count("step_attempts_default"), 0, "every attempt in a daily partition");

    const { rows } = await c.query<Record<string, string>>(
      `select count(distinct t.id)::text as tasks, count(distinct s.id)::text as steps,
              count(*) filter (where t.idempotency_key is not null)::text as keys,
              count(*) filter (where t.history_seq <> 3 or s.history_seq <> 3)::text as counters,
              count(*) filter (where s.name_length <> 4)::text as generated,
              count(*) filter (where t.finished_at - t.created_at <> interval '2 seconds')::text as durations,
              count(distinct date_trunc('day', t.created_at))::text as days,
              extract(epoch from $1::timestamptz - min(t.created_at))::text as oldest_s,
              extract(epoch from max(t.created_at) - $1::timestamptz)::text as newest_s
       from ${target}.tasks t join ${target}.steps s on s.task_id = t.id`,
      [anchor],
    );
    const r = rows[0]!;
    assert.equal(r.tasks, "1000");
    assert.equal(r.steps, "1000");
    assert.equal(r.keys, "0", "idempotency keys are unique: copies carry none");
    assert.equal(r.counters, "0", "history_seq copied as the model has it");
    assert.equal(r.generated, "0");
    assert.equal(r.durations, "0", "each copy keeps the model's durations");
    assert.ok(Number(r.days) >= HISTORY_DAYS, `copies over ${r.days} days`);
    assert.ok(
      Number(r.oldest_s) <= HISTORY_DAYS * 86_400 && Number(r.oldest_s) > (HISTORY_DAYS - 1) * 86_400,
    );
    assert.ok(Number(r.newest_s) <= 1, "no copy after the anchor");

    // every copy's transitions and attempt name that copy's own step, task and attempt
    const { rows: links } = await c.query<{ bad: string }>(
      `select count(*)::text as bad from ${target}.step_transitions tr
       join ${target}.steps s on s.id = tr.step_id
       left join ${target}.step_attempts a on a.step_id = s.id
       where tr.task_id <> s.task_id or a.task_id <> s.task_id
          or (tr.to_state = 'ready') <> (tr.attempt_id is null)
          or (tr.attempt_id is not null and tr.attempt_id <> a.attempt_id)`,
    );
    assert.equal(links[0]!.bad, "0");
    const { rows: seqs } = await c.query<{ n: string }>(
      `select count(distinct seq)::text as n from ${target}.task_transitions`,
    );
    assert.equal(seqs[0]!.n, "3000", "identity values numbered by the target");
  });
});

describe("bench: the _legacy partitions bounded before a backdated history", function () {
  this.timeout(30_000);
  const schema = uniqueSchemaName("legacy_bound");
  let c: pg.Client;

  before(async () => {
    c = new pg.Client({ connectionString: databaseUrl() });
    await c.connect();
    const tomorrow = startOfDay(new Date(), 1).toISOString();
    await c.query(`
create schema ${schema};
set search_path = ${schema};
create table empty_one (at timestamptz not null) partition by range (at);
create table empty_one_legacy partition of empty_one for values from (minvalue) to ('${tomorrow}');
create table held (at timestamptz not null) partition by range (at);
create table held_legacy partition of held for values from (minvalue) to ('${tomorrow}');
insert into held values (now() - interval '3 days');
reset search_path;`);
  });

  after(async () => {
    await c?.end();
    await dropSchema(schema);
  });

  it("moves an empty _legacy bound back, and leaves one holding rows as it is", async () => {
    const before = startOfDay(new Date(), -HISTORY_DAYS - 1);
    assert.equal(await boundLegacyPartitions(c, schema, before), 1);
    const { rows } = await c.query<{ name: string; bound: string }>(
      `select cl.relname as name, pg_get_expr(cl.relpartbound, cl.oid) as bound from pg_class cl
       join pg_namespace n on n.oid = cl.relnamespace where n.nspname = $1 and cl.relispartition order by 1`,
      [schema],
    );
    assert.equal(rows.length, 2);
    assert.equal(rows[0]!.name, "empty_one_legacy");
    const upper = (bound: string) => new Date(/TO \('([^']+)'\)/.exec(bound)![1]!).getTime();
    assert.equal(upper(rows[0]!.bound), before.getTime(), rows[0]!.bound);
    assert.equal(rows[1]!.name, "held_legacy");
    assert.equal(upper(rows[1]!.bound), startOfDay(new Date(), 1).getTime(), rows[1]!.bound);
    // a row of a day after the new bound now needs a partition of its own
    await assert.rejects(c.query(`insert into ${schema}.empty_one values (now())`), /no partition/);
  });
});

describe("bench: measureClaims on the migrated schema", function () {
  this.timeout(240_000);
  const quiet = () => undefined;

  async function historySchemas(): Promise<string[]> {
    const c = new pg.Client({ connectionString: databaseUrl() });
    await c.connect();
    try {
      const { rows } = await c.query<{ nspname: string }>(
        `select nspname from pg_namespace where nspname like 'bench\\_claims\\_%' order by 1`,
      );
      return rows.map((r) => r.nspname);
    } finally {
      await c.end();
    }
  }

  after(async () => {
    for (const s of await historySchemas()) await dropSchema(s);
  });

  /** Rows of `table` in `schema`, by the partition holding them. */
  async function partitionsHolding(schema: string, table: string): Promise<Map<string, number>> {
    const c = new pg.Client({ connectionString: databaseUrl() });
    await c.connect();
    try {
      const { rows } = await c.query<{ part: string; n: number }>(
        `select tableoid::regclass::text as part, count(*)::int as n from ${schema}.${table} group by 1`,
      );
      return new Map(rows.map((r) => [r.part.replace(`${schema}.`, ""), r.n]));
    } finally {
      await c.end();
    }
  }

  it("claims beside a copied history in interleaved rounds, then drops both schemas", async () => {
    const r = await measureClaims({
      databaseUrl: databaseUrl(),
      history: 3000,
      ready: 300,
      maxSeconds: 60,
      rounds: 2,
      log: quiet,
    });
    assert.equal(r.empty.completed, 300);
    assert.equal(r.withHistory.completed, 300);
    assert.equal(r.emptyRuns.length, 2);
    assert.equal(r.withHistoryRuns.length, 2);
    assert.equal(r.historyInserted, 3000);
    // beside the 3000 copies: in the second round, also the first round's 300
    assert.ok([3000, 3300].includes(r.withHistory.historySteps), String(r.withHistory.historySteps));
    // the "empty" schema holds only the model tasks, and then the first round's 300
    assert.ok([10, 310].includes(r.empty.historySteps), String(r.empty.historySteps));
    assert.ok(r.historyBytes > 0);
    assert.deepEqual(await historySchemas(), [], "a history that is not kept is dropped");
  });

  it("keeps a history, and the next run reuses it without inserting", async () => {
    // enough copies that the two runs' 200 ready steps leave pages of copies for the check at the end
    const KEPT = 10_000;
    const first = await measureClaims({
      databaseUrl: databaseUrl(),
      history: KEPT,
      ready: 100,
      maxSeconds: 60,
      keepHistory: true,
      log: quiet,
    });
    assert.equal(first.historyReused, false);
    assert.equal(first.historyInserted, KEPT);
    const kept = await historySchemas();
    assert.equal(kept.length, 1);
    assert.match(kept[0]!, new RegExp(`^bench_claims_h${KEPT}_[0-9a-f]{10}$`));
    // laid out as history written day by day: nothing in _legacy (it ends before the first
    // copy's day), each copy in its day's partition
    const layout = await partitionsHolding(kept[0]!, "step_attempts");
    assert.equal(layout.get("step_attempts_legacy") ?? 0, 0, JSON.stringify([...layout]));
    assert.equal(layout.get("step_attempts_default") ?? 0, 0, JSON.stringify([...layout]));
    assert.ok(layout.size >= HISTORY_DAYS, `copies' attempts in ${layout.size} partitions`);
    assert.equal(
      [...layout.values()].reduce((a, b) => a + b, 0),
      KEPT + 100,
      "the copies and the measured tasks",
    );

    const second = await measureClaims({
      databaseUrl: databaseUrl(),
      history: KEPT,
      ready: 100,
      maxSeconds: 60,
      keepHistory: true,
      log: quiet,
    });
    assert.equal(second.historyReused, true);
    assert.equal(second.historyInserted, 0);
    assert.equal(second.withHistory.completed, 100);
    // the first run's ready tasks finished there too, and stay part of the history
    assert.equal(second.withHistory.historySteps, KEPT + 100);
    assert.deepEqual(await historySchemas(), kept);

    // the copies' pages are full: new ready steps share pages (an insert at steps' fillfactor
    // 70 found a one-row slack on every page of copies, one ready step per page); and the
    // migrations' fillfactors are back for the rows written after the build
    const sm = new StateManager(
      await openDatabase({ databaseUrl: databaseUrl(), schema: kept[0]!, poolSize: 1 }),
    );
    try {
      await sm.createTasks(
        Array.from({ length: 50 }, (_, i) => ({ namespace: "bench", name: "claims", context: { n: i } })),
      );
      const { rows } = await sm.db.pool.query<{ pages: number; options: string[] }>(
        `select count(distinct (ctid::text::point)[0])::int as pages,
                (select reloptions from pg_class where oid = 'steps'::regclass) as options
         from steps where state = 'ready'`,
      );
      assert.ok(rows[0]!.pages <= 5, `50 ready steps on ${rows[0]!.pages} pages`);
      assert.deepEqual(rows[0]!.options, ["fillfactor=70"]);
    } finally {
      await sm.close();
    }
  });
});
