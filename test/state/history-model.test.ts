/**
 * The insert-only history of migration 0013, on the tables: a running attempt
 * is its step's lease and gets its one row when it ends, and a database that
 * holds history written before 0013 migrates forward with that history
 * readable, its in-flight attempt carried over to the lease.
 */
import assert from "node:assert/strict";
import pg from "pg";
import { listMigrations } from "../../broker/db/migrate";
import { openDatabase } from "../../broker/db/openDatabase";
import { quoteIdentifier } from "../../broker/db/identifiers";
import { StateManager } from "../../broker/state/StateManager";
import { databaseUrl, dropSchema, uniqueSchemaName, useStateManager } from "../support/db";
import { assertInvariants } from "../support/invariants";

describe("insert-only history (0013)", function () {
  this.timeout(60_000);

  describe("an attempt's one row", () => {
    const t = useStateManager("history_model");

    it("shows a running attempt from its lease, and writes its row once when it ends", async () => {
      await t.sm.registerTemplate({
        namespace: "h",
        name: "one",
        version: "1",
        steps: [{ name: "s", handler: "h" }],
      });
      const [taskId] = await t.sm.createTasks([{ namespace: "h", name: "one", context: {} }]);
      assert.ok(taskId);
      const [claimed] = await t.sm.claimSteps({
        brokerId: "b1",
        handlers: ["h"],
        limit: 1,
        poolId: "pool-1",
      });
      assert.ok(claimed);

      const running = await t.sm.getAttempts(taskId);
      assert.equal(running.length, 1);
      assert.equal(running[0]?.attemptId, claimed.attempt_id);
      assert.equal(running[0]?.poolId, "pool-1");
      assert.equal(running[0]?.brokerId, "b1");
      assert.equal(running[0]?.outcome, null);
      assert.equal(running[0]?.finishedAt, null);
      const rows = await t.sql(`select 1 from step_attempts where attempt_id = $1`, [claimed.attempt_id]);
      assert.equal(rows.length, 0, "no row while the attempt runs");
      await assertInvariants(t);

      await t.sm.completeAttempts([
        { attemptId: claimed.attempt_id, status: "complete", output: { ok: true } },
      ]);
      const ended = await t.sm.getAttempts(taskId);
      assert.equal(ended.length, 1);
      assert.equal(ended[0]?.outcome, "complete");
      assert.equal(ended[0]?.startedAt, running[0]?.startedAt, "the row keeps the lease's start");
      assert.equal(ended[0]?.poolId, "pool-1");
      const [seq] = await t.sql<{ step: number; task: number }>(
        `select s.history_seq as step, t.history_seq as task from steps s join tasks t on t.id = s.task_id where t.id = $1`,
        [taskId],
      );
      // created, claimed, completed; created, started, completed
      assert.deepEqual(seq, { step: 3, task: 3 });
      await assertInvariants(t);

      // a second result for the same attempt stores nothing and writes no second row
      const again = await t.sm.completeAttempts([
        { attemptId: claimed.attempt_id, status: "complete", output: 1 },
      ]);
      assert.equal(again.outcomes[0]?.outcome, "duplicate");
      await assertInvariants(t);
    });

    it("writes the row of an attempt that ends without a result: lost, and cancelled", async () => {
      const [taskId] = await t.sm.createTasks([{ namespace: "h", name: "one", context: {} }]);
      assert.ok(taskId);
      const [first] = await t.sm.claimSteps({ brokerId: "b1", handlers: ["h"], limit: 1, poolId: "pool-1" });
      assert.ok(first);
      await t.sm.releaseAttempts([first.attempt_id], { countAttempt: true, reason: "pool lost" });
      const [second] = await t.sm.claimSteps({ brokerId: "b1", handlers: ["h"], limit: 1, poolId: "pool-2" });
      assert.ok(second);
      await t.sm.cancelTask(taskId);
      const attempts = await t.sm.getAttempts(taskId);
      assert.deepEqual(
        attempts.map((a) => [a.attemptId, a.poolId, a.outcome]),
        [
          [first.attempt_id, "pool-1", "lost"],
          [second.attempt_id, "pool-2", "cancelled"],
        ],
      );
      await assertInvariants(t);
    });
  });

  describe("a database migrated forward from 0012", () => {
    const schema = uniqueSchemaName("history_forward");
    let sm: StateManager | undefined;
    const ids = {
      done: "01900000-0000-7000-8000-000000000001",
      doneStep: "01900000-0000-7000-8000-000000000002",
      doneAttempt: "01900000-0000-7000-8000-000000000003",
      busy: "01900000-0000-7000-8000-000000000004",
      busyStep: "01900000-0000-7000-8000-000000000005",
      busyAttempt: "01900000-0000-7000-8000-000000000006",
    };

    before(async () => {
      // Migrations up to 0012, then history as that model wrote it (most_recent flags, the running
      // attempt's row already inserted), then the rest of the migrations.
      const client = new pg.Client({ connectionString: databaseUrl() });
      await client.connect();
      try {
        const q = quoteIdentifier(schema, "schema");
        await client.query(`create schema ${q}`);
        await client.query(`set search_path to ${q}`);
        await client.query(
          `create table schema_migrations (name text primary key, checksum text not null, applied_at timestamptz not null default now())`,
        );
        for (const m of listMigrations().filter((m) => m.name < "0013")) {
          await client.query(m.sql);
          await client.query(`insert into schema_migrations (name, checksum) values ($1, $2)`, [
            m.name,
            m.checksum,
          ]);
        }
        await client.query(`
          insert into task_templates (namespace, name, version, definition)
            values ('h', 'one', '1', '{"steps": []}');
          insert into tasks (id, template_id, state, context, finished_at, created_at)
            values ('${ids.done}', 1, 'complete', '{}', now() - interval '2 days', now() - interval '2 days'),
                   ('${ids.busy}', 1, 'in_progress', '{}', null, now() - interval '1 minute');
          insert into steps (id, task_id, position, name, handler, config, state, output, has_output, attempts,
                             max_attempts, retryable, backoff_initial_ms, backoff_multiplier, backoff_max_ms,
                             backoff_jitter, timeout_ms, pending_parents, finished_at,
                             lease_attempt_id, lease_broker_id, lease_expires_at)
            values ('${ids.doneStep}', '${ids.done}', 0, 's', 'h', '{}', 'complete', '{"v": 1}', true, 1,
                    3, true, 10, 2, 1000, 0, 60000, 0, now() - interval '2 days', null, null, null),
                   ('${ids.busyStep}', '${ids.busy}', 0, 's', 'h', '{}', 'in_progress', null, false, 1,
                    3, true, 10, 2, 1000, 0, 60000, 0, null,
                    '${ids.busyAttempt}', 'old-broker', now() + interval '1 minute');
          insert into step_attempts (attempt_id, step_id, task_id, attempt, broker_id, pool_id, started_at,
                                     finished_at, duration_ms, outcome)
            values ('${ids.doneAttempt}', '${ids.doneStep}', '${ids.done}', 1, 'old-broker', 'old-pool',
                    now() - interval '2 days', now() - interval '2 days', 5, 'complete'),
                   ('${ids.busyAttempt}', '${ids.busyStep}', '${ids.busy}', 1, 'old-broker', 'old-pool',
                    now() - interval '30 seconds', null, null, null);
          insert into step_transitions (step_id, task_id, from_state, to_state, event, attempt_id, sort_key, most_recent, created_at)
            values ('${ids.doneStep}', '${ids.done}', null, 'ready', 'created', null, 1, false, now() - interval '2 days'),
                   ('${ids.doneStep}', '${ids.done}', 'ready', 'in_progress', 'claimed', '${ids.doneAttempt}', 2, false, now() - interval '2 days' + interval '1 second'),
                   ('${ids.doneStep}', '${ids.done}', 'in_progress', 'complete', 'completed', '${ids.doneAttempt}', 3, true, now() - interval '2 days' + interval '2 seconds'),
                   ('${ids.busyStep}', '${ids.busy}', null, 'ready', 'created', null, 1, false, now() - interval '1 minute'),
                   ('${ids.busyStep}', '${ids.busy}', 'ready', 'in_progress', 'claimed', '${ids.busyAttempt}', 2, true, now() - interval '30 seconds');
          insert into task_transitions (task_id, from_state, to_state, event, sort_key, most_recent, created_at)
            values ('${ids.done}', null, 'pending', 'created', 1, false, now() - interval '2 days'),
                   ('${ids.done}', 'pending', 'in_progress', 'started', 2, false, now() - interval '2 days' + interval '1 second'),
                   ('${ids.done}', 'in_progress', 'complete', 'completed', 3, true, now() - interval '2 days' + interval '2 seconds'),
                   ('${ids.busy}', null, 'pending', 'created', 1, false, now() - interval '1 minute'),
                   ('${ids.busy}', 'pending', 'in_progress', 'started', 2, true, now() - interval '30 seconds');
        `);
      } finally {
        await client.end();
      }
      sm = new StateManager(await openDatabase({ databaseUrl: databaseUrl(), schema, poolSize: 4 }));
      assert.deepEqual(
        await sm.migrate(),
        listMigrations()
          .map((m) => m.name)
          .filter((n) => n >= "0013"),
      );
    });
    after(async () => {
      try {
        await sm?.close();
      } finally {
        await dropSchema(schema);
      }
    });
    const sql = async <R extends pg.QueryResultRow>(text: string, values: unknown[] = []): Promise<R[]> => {
      assert.ok(sm);
      return (await sm.db.pool.query<R>(text, values)).rows;
    };

    it("keeps the old history readable, in the legacy partitions, with the counters set from it", async () => {
      assert.ok(sm);
      const transitions = await sm.getTransitions(ids.done);
      assert.deepEqual(
        transitions.map((r) => [r.stepId === null ? "task" : "step", r.to, r.event]),
        [
          ["task", "pending", "created"],
          ["step", "ready", "created"],
          ["task", "in_progress", "started"],
          ["step", "in_progress", "claimed"],
          ["task", "complete", "completed"],
          ["step", "complete", "completed"],
        ],
      );
      const attempts = await sm.getAttempts(ids.done);
      assert.deepEqual(
        attempts.map((a) => [a.attemptId, a.poolId, a.outcome]),
        [[ids.doneAttempt, "old-pool", "complete"]],
      );
      const where = await sql<{ part: string }>(
        `select distinct tableoid::regclass::text as part from step_transitions where step_id = $1`,
        [ids.doneStep],
      );
      assert.deepEqual(where, [{ part: "step_transitions_legacy" }]);
      const counters = await sql<{ id: string; history_seq: number }>(
        `select id, history_seq from steps union all select id, history_seq from tasks order by id`,
      );
      assert.deepEqual(
        counters.map((c) => c.history_seq),
        [3, 3, 2, 2],
      );
      await assertInvariants({ sql });
      await assert.rejects(
        sql(`update step_transitions set event = 'x' where step_id = $1`, [ids.doneStep]),
        /append-only/,
      );
    });

    it("carries the attempt that was running over to its step's lease, and writes its row when it ends", async () => {
      assert.ok(sm);
      const [lease] = await sql<{ lease_pool_id: string; lease_started_at: Date; rows: number }>(
        `select s.lease_pool_id, s.lease_started_at,
                (select count(*)::int from step_attempts a where a.attempt_id = s.lease_attempt_id) as rows
         from steps s where s.id = $1`,
        [ids.busyStep],
      );
      assert.equal(lease?.lease_pool_id, "old-pool");
      assert.equal(lease?.rows, 0, "the running attempt's half-written row went to the lease");
      const running = await sm.getAttempts(ids.busy);
      assert.deepEqual(
        running.map((a) => [a.attemptId, a.poolId, a.outcome]),
        [[ids.busyAttempt, "old-pool", null]],
      );

      const done = await sm.completeAttempts([{ attemptId: ids.busyAttempt, status: "complete", output: 7 }]);
      assert.equal(done.outcomes[0]?.outcome, "stored");
      const ended = await sm.getAttempts(ids.busy);
      assert.deepEqual(
        ended.map((a) => [a.attemptId, a.poolId, a.outcome, a.startedAt]),
        [[ids.busyAttempt, "old-pool", "complete", lease?.lease_started_at.toISOString()]],
      );
      assert.equal((await sm.getTask(ids.busy))?.state, "complete");
      await assertInvariants({ sql });
    });
  });
});
