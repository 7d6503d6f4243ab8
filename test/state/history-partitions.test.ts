/**
 * The history tables' day partitions (migration 0013, sql/functions/
 * ensure_history_partitions.sql and prune_history_partitions.sql) on a real
 * PostgreSQL: created ahead and idempotently, by two callers at once, rows
 * routed to them, the default partition's rows moved into them, and
 * retention that drops whole partitions only where no remaining task has
 * history.
 */
import assert from "node:assert/strict";
import { openDatabase } from "../../broker/db/openDatabase";
import { StateManager } from "../../broker/state/StateManager";
import type { HistoryPartition } from "../../broker/state/HistoryPartitions";
import { parseCutoff } from "../../broker/state/HistoryPartitions";
import { type TestState, databaseUrl, useStateManager } from "../support/db";
import { assertInvariants } from "../support/invariants";
import { claim, createScenario, succeed } from "../support/scenario";

const HISTORY = ["step_attempts", "step_transitions", "task_transitions"] as const;
const DAY = 86_400_000;

/** The UTC day `offset` days from today, as the partition suffix YYYYMMDD. */
function daySuffix(offset: number): string {
  return new Date(Date.now() + offset * DAY).toISOString().slice(0, 10).replaceAll("-", "");
}

/** UTC midnight starting the day `offset` days from today. */
function midnight(offset: number): Date {
  const d = new Date(Date.now() + offset * DAY);
  return new Date(Date.UTC(d.getUTCFullYear(), d.getUTCMonth(), d.getUTCDate()));
}

function namesOf(partitions: HistoryPartition[], parent?: string): string[] {
  return partitions
    .filter((p) => parent === undefined || p.parentTable === parent)
    .map((p) => p.partitionName)
    .sort();
}

/** The partition a task_transitions row of `taskId` is stored in. */
async function partitionOfTransition(t: TestState, taskId: string): Promise<string[]> {
  const rows = await t.sql<{ part: string }>(
    `select tableoid::regclass::text as part from task_transitions where task_id = $1`,
    [taskId],
  );
  return rows.map((r) => r.part);
}

/**
 * As if the schema had been migrated `days` ago: each _legacy partition ends
 * at that day's midnight instead of tonight's (the schema is fresh, so the
 * legacy tables are empty and may be re-attached with any bound).
 */
async function migratedDaysAgo(t: TestState, days: number): Promise<void> {
  for (const table of HISTORY) {
    await t.sql(`alter table ${table} detach partition ${table}_legacy`);
    await t.sql(
      `alter table ${table} attach partition ${table}_legacy for values from (minvalue) to ('${midnight(-days + 1).toISOString()}')`,
    );
  }
}

/**
 * Moves a task, and every history row of it, `days` into the past. History
 * rows are never updated, so they are deleted and inserted again shifted:
 * they go to whichever partition covers their new time (the default one when
 * none does).
 */
async function backdate(t: TestState, taskId: string, days: number): Promise<void> {
  const by = `${days} days`;
  await t.sql(
    `update tasks set created_at = created_at - $2::interval, started_at = started_at - $2::interval,
            finished_at = finished_at - $2::interval where id = $1`,
    [taskId, by],
  );
  await t.sql(
    `with gone as (delete from task_transitions where task_id = $1 returning *)
     insert into task_transitions (task_id, from_state, to_state, event, attempt_id, metadata, sort_key, created_at)
     select task_id, from_state, to_state, event, attempt_id, metadata, sort_key, created_at - $2::interval from gone`,
    [taskId, by],
  );
  await t.sql(
    `with gone as (delete from step_transitions where task_id = $1 returning *)
     insert into step_transitions (step_id, task_id, from_state, to_state, event, attempt_id, metadata, sort_key, created_at)
     select step_id, task_id, from_state, to_state, event, attempt_id, metadata, sort_key, created_at - $2::interval from gone`,
    [taskId, by],
  );
  await t.sql(
    `with gone as (delete from step_attempts where task_id = $1 returning *)
     insert into step_attempts (attempt_id, step_id, task_id, attempt, broker_id, pool_id, started_at, finished_at,
                                duration_ms, outcome, error, output_bytes, cost, tokens, artifacts)
     select attempt_id, step_id, task_id, attempt, broker_id, pool_id, started_at - $2::interval,
            finished_at - $2::interval, duration_ms, outcome, error, output_bytes, cost, tokens, artifacts
     from gone`,
    [taskId, by],
  );
}

/** A one-step task run to completion. */
async function finishedTask(t: TestState): Promise<string> {
  const task = await createScenario(t.sm, [{ name: "only" }]);
  const [step] = await claim(t.sm, task, ["only"]);
  await succeed(t.sm, step!);
  assert.equal((await t.sm.getTask(task.task_id))?.state, "complete");
  return task.task_id;
}

async function historyRows(t: TestState, taskId: string): Promise<number> {
  const [row] = await t.sql<{ n: number }>(
    `select (select count(*) from task_transitions where task_id = $1)
          + (select count(*) from step_transitions where task_id = $1)
          + (select count(*) from step_attempts where task_id = $1) as n`,
    [taskId],
  );
  return Number(row!.n);
}

describe("history partitions", function () {
  this.timeout(60_000);

  describe("created ahead", () => {
    const t = useStateManager("hpart_ensure");

    it("creates the UTC-day partitions after the legacy one through N days ahead, and a second call creates none", async () => {
      const before = await t.sm.listHistoryPartitions();
      // right after the migration: each table has its _legacy (to tonight) and _default partition
      assert.deepEqual(namesOf(before), HISTORY.flatMap((h) => [`${h}_default`, `${h}_legacy`]).sort());
      const legacy = before.find((p) => p.partitionName === "step_transitions_legacy")!;
      assert.equal(legacy.rangeFrom, null);
      assert.equal(legacy.rangeTo, midnight(1).toISOString());

      const created = await t.sm.ensureHistoryPartitions(3);
      // today is the legacy partition's: days 1..3 for each table
      assert.deepEqual(
        created.map((c) => c.partitionName).sort(),
        HISTORY.flatMap((h) => [1, 2, 3].map((d) => `${h}_p${daySuffix(d)}`)).sort(),
      );
      const second = created.find((c) => c.partitionName === `task_transitions_p${daySuffix(2)}`)!;
      assert.equal(second.rangeFrom, midnight(2).toISOString());
      assert.equal(second.rangeTo, midnight(3).toISOString());
      assert.ok(created.every((c) => c.movedRows === 0));

      assert.deepEqual(await t.sm.ensureHistoryPartitions(3), [], "idempotent");
      const after = await t.sm.listHistoryPartitions();
      assert.equal(after.length, 3 * 5);
      // the partitions the catalog lists are exactly those its parents route to
      const [{ n }] = (await t.sql<{ n: number }>(
        `select count(*)::int as n from pg_inherits i join pg_class p on p.oid = i.inhparent
         where p.relname in ('step_transitions', 'task_transitions', 'step_attempts')
           and p.relnamespace = current_schema()::regnamespace`,
      )) as [{ n: number }];
      assert.equal(n, after.length);
      // the day partitions carry the parent's insert-only trigger (cloned at attach)
      await t.sql(
        `insert into task_transitions (task_id, to_state, event, sort_key, created_at)
         values (gen_random_uuid(), 'pending', 'created', 1, now() + interval '1 day')`,
      );
      await assert.rejects(t.sql(`update task_transitions_p${daySuffix(1)} set event = 'x'`), /append-only/);
    });

    it("refuses a number of days it cannot mean", async () => {
      await assert.rejects(t.sm.ensureHistoryPartitions(-1), /0 to 366/);
      await assert.rejects(t.sm.ensureHistoryPartitions(1.5), /0 to 366/);
    });

    it("two callers at once both succeed and create each partition once", async () => {
      const other = new StateManager(await openDatabase({ databaseUrl: databaseUrl(), schema: t.schema }));
      try {
        const [a, b] = await Promise.all([t.sm.ensureHistoryPartitions(6), other.ensureHistoryPartitions(6)]);
        const all = [...a, ...b].map((c) => c.partitionName).sort();
        assert.deepEqual(all, HISTORY.flatMap((h) => [4, 5, 6].map((d) => `${h}_p${daySuffix(d)}`)).sort());
        assert.equal((await t.sm.listHistoryPartitions()).length, 3 * 8);
      } finally {
        await other.close();
      }
    });

    it("routes a row to its day's partition, and one no partition covers to the default", async () => {
      const [{ id }] = (await t.sql<{ id: string }>(`select gen_random_uuid() as id`)) as [{ id: string }];
      await t.sql(
        `insert into task_transitions (task_id, to_state, event, sort_key, created_at)
         values ($1, 'pending', 'created', 1, now() + interval '2 days'),
                ($1, 'running', 'started', 2, now() + interval '20 days')`,
        [id],
      );
      assert.deepEqual(
        (await partitionOfTransition(t, id)).sort(),
        [`task_transitions_default`, `task_transitions_p${daySuffix(2)}`].sort(),
      );
    });

    it("moves the default partition's rows of a day into the partition it creates for it", async () => {
      const created = await t.sm.ensureHistoryPartitions(6);
      // the row 20 days ahead was in the default: its day is created and the row moves there
      assert.deepEqual(
        created.map((c) => [c.partitionName, c.movedRows]),
        [[`task_transitions_p${daySuffix(20)}`, 1]],
      );
      const [{ n }] = (await t.sql<{ n: number }>(
        `select count(*)::int as n from task_transitions_default`,
      )) as [{ n: number }];
      assert.equal(n, 0, "the default partition is empty again");
      const rows = await t.sql<{ part: string }>(
        `select tableoid::regclass::text as part from task_transitions where created_at > now() + interval '19 days'`,
      );
      assert.deepEqual(
        rows.map((r) => r.part),
        [`task_transitions_p${daySuffix(20)}`],
      );
    });

    it("gives up within its lock timeout while a reader holds the default partition, changing nothing, and succeeds after", async () => {
      const reader = await t.db.pool.connect();
      const before = namesOf(await t.sm.listHistoryPartitions());
      try {
        await reader.query("begin");
        // a read of the whole table holds every partition, the default one included
        await reader.query("select count(*) from task_transitions");
        const started = Date.now();
        await assert.rejects(t.sm.ensureHistoryPartitions(7), (e: Error) => {
          assert.equal((e.cause as { code?: string } | undefined)?.code, "55P03", String(e.cause));
          return true;
        });
        assert.ok(Date.now() - started < 10_000, "bounded by lock_timeout, not the reader");
        assert.deepEqual(namesOf(await t.sm.listHistoryPartitions()), before, "all or nothing");
      } finally {
        await reader.query("rollback");
        reader.release();
      }
      const created = await t.sm.ensureHistoryPartitions(7);
      assert.deepEqual(
        created.map((c) => c.partitionName).sort(),
        HISTORY.map((h) => `${h}_p${daySuffix(7)}`).sort(),
      );
    });
  });

  describe("retention", () => {
    const t = useStateManager("hpart_prune");
    let old: string;
    let recent: string;
    let stuck: string;

    before(async () => {
      await migratedDaysAgo(t, 10);
      old = await finishedTask(t);
      await backdate(t, old, 8);
      recent = await finishedTask(t);
      await backdate(t, recent, 2);
      // created six days ago and never run: still present, not finished
      stuck = (await createScenario(t.sm, [{ name: "never" }])).task_id;
      await backdate(t, stuck, 6);
      // the backdated rows went to the default partitions; ensure gives their days partitions
      const created = await t.sm.ensureHistoryPartitions(3);
      const moved = created.filter((c) => c.movedRows > 0).map((c) => c.partitionName);
      assert.deepEqual(
        moved.sort(),
        [
          `step_attempts_p${daySuffix(-8)}`,
          `step_attempts_p${daySuffix(-2)}`,
          ...[-8, -6, -2].flatMap((d) => [
            `step_transitions_p${daySuffix(d)}`,
            `task_transitions_p${daySuffix(d)}`,
          ]),
        ].sort(),
      );
      await assertInvariants(t);
    });

    it("deletes the finished tasks older than the cutoff and drops only partitions no remaining task has history in", async () => {
      const out = await t.sm.pruneHistory(new Date(Date.now() - 5 * DAY), { batch: 1 });
      assert.equal(out.deletedTasks, 1);
      assert.equal(await t.sm.getTask(old), null);
      // legacy and the day of the old task go; the stuck task's day (and everything after) stays
      assert.deepEqual(
        namesOf(out.dropped),
        [
          ...HISTORY.map((h) => `${h}_legacy`),
          `step_attempts_p${daySuffix(-8)}`,
          `step_transitions_p${daySuffix(-8)}`,
          `task_transitions_p${daySuffix(-8)}`,
        ].sort(),
      );
      assert.equal(await historyRows(t, old), 0);
      // six days old, so before the cutoff, but held back by the task that is still present
      assert.ok(out.heldBack);
      assert.equal(out.heldBack.taskId, stuck);
      assert.equal(out.heldBack.state, "pending");
      const left = namesOf(await t.sm.listHistoryPartitions());
      assert.ok(left.includes(`task_transitions_p${daySuffix(-6)}`));
      const history = await t.sm.getHistory(stuck);
      assert.ok(history && history.transitions.length > 0, "the stuck task keeps its history");
      assert.ok((await historyRows(t, recent)) > 0, "the recent task keeps its history");
      await assertInvariants(t);
    });

    it("a second prune with the same cutoff drops nothing more", async () => {
      const out = await t.sm.pruneHistory(new Date(Date.now() - 5 * DAY));
      assert.equal(out.deletedTasks, 0);
      assert.deepEqual(out.dropped, []);
    });

    it("once the held-back task is gone, its partitions drop and no history row is left behind", async () => {
      await t.sm.cancelTask(stuck);
      // a cutoff in the future takes every finished task; partitions newer than an hour ago stay
      const out = await t.sm.pruneHistory(new Date(Date.now() + DAY));
      assert.equal(out.deletedTasks, 2);
      assert.equal(out.heldBack, null);
      const names = namesOf(out.dropped);
      for (const d of [-6, -2]) assert.ok(names.includes(`task_transitions_p${daySuffix(d)}`), names.join());
      assert.ok(!names.some((n) => n.endsWith(daySuffix(0))), "today's partitions stay");
      for (const h of HISTORY) {
        const [{ n }] = (await t.sql<{ n: number }>(`select count(*)::int as n from ${h}`)) as [
          { n: number },
        ];
        assert.equal(n, 0, `${h} is empty`);
      }
      await assertInvariants(t);
      // and the broker's next ensure has nothing to recreate in the past
      assert.deepEqual(await t.sm.ensureHistoryPartitions(3), []);
    });
  });

  describe("retention held back by an older running task", () => {
    const t = useStateManager("hpart_held");

    it("deletes the old finished task but leaves its rows to the partition drop the older task holds back", async () => {
      await migratedDaysAgo(t, 12);
      const older = (await createScenario(t.sm, [{ name: "never" }])).task_id;
      await backdate(t, older, 9);
      const old = await finishedTask(t);
      await backdate(t, old, 8);
      await t.sm.ensureHistoryPartitions(1);
      const rowsBefore = await historyRows(t, old);
      assert.ok(rowsBefore > 0);

      const out = await t.sm.pruneHistory(new Date(Date.now() - 5 * DAY));
      assert.equal(out.deletedTasks, 1);
      assert.equal(await t.sm.getTask(old), null);
      // only the legacy partitions end before the older task's creation
      assert.deepEqual(namesOf(out.dropped), HISTORY.map((h) => `${h}_legacy`).sort());
      assert.equal(out.heldBack?.taskId, older);
      // the delete triggers did not delete the old task's rows one by one: they wait in their
      // partition, which no task names any more, for the drop
      assert.equal(await historyRows(t, old), rowsBefore);
      assert.ok((await t.sm.getHistory(older))!.transitions.length > 0);
      await assertInvariants(t);

      await t.sm.cancelTask(older);
      const later = await t.sm.pruneHistory(new Date(Date.now() + DAY));
      assert.ok(namesOf(later.dropped).includes(`step_transitions_p${daySuffix(-8)}`));
      assert.equal(await historyRows(t, old), 0, "gone with the drop");
      assert.equal(await historyRows(t, older), 0);
      await assertInvariants(t);
    });
  });

  describe("cutoffs", () => {
    it("reads Nd and ISO dates, and refuses anything else", () => {
      const now = new Date("2026-12-01T12:00:00Z");
      assert.equal(parseCutoff("30d", now).toISOString(), "2026-11-01T12:00:00.000Z");
      assert.equal(parseCutoff("2026-11-01", now).toISOString(), "2026-11-01T00:00:00.000Z");
      assert.equal(parseCutoff("2026-11-01T06:00:00Z", now).toISOString(), "2026-11-01T06:00:00.000Z");
      assert.throws(() => parseCutoff("yesterday", now), /neither Nd/);
      assert.throws(() => parseCutoff("30", now), /neither Nd/);
    });
  });
});
