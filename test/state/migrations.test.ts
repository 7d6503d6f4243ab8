import assert from "node:assert/strict";
import { type ChildProcessWithoutNullStreams, spawn } from "node:child_process";
import { StepStates, TaskStates } from "../../protocol/constants";
import { assertIdentifier } from "../../broker/db/identifiers";
import { readFileSync } from "node:fs";
import { listFunctions, listMigrations } from "../../broker/db/migrate";
import { openDatabase } from "../../broker/db/openDatabase";
import { STEP_MOVES, TASK_MOVES } from "../../broker/state/transitions";
import { databaseUrl, dropSchema, uniqueSchemaName, useStateManager } from "../support/db";

/** Spawns a migrator process and resolves once it is connected and waiting for "go". */
function startMigrator(
  schema: string,
): Promise<{ child: ChildProcessWithoutNullStreams; result: Promise<string[]> }> {
  const child = spawn(
    process.execPath,
    ["--import", "tsx", "test/support/migrate-child.ts", databaseUrl(), schema],
    {
      stdio: ["pipe", "pipe", "pipe"],
    },
  );
  let out = "";
  let err = "";
  child.stderr.on("data", (d: Buffer) => (err += d.toString()));
  const result = new Promise<string[]>((resolve, reject) => {
    child.on("exit", (code) => {
      if (code !== 0) return reject(new Error(`migrator exited with ${code}: ${err}`));
      const last = out.trim().split("\n").at(-1) ?? "[]";
      resolve(JSON.parse(last) as string[]);
    });
  });
  return new Promise((resolve, reject) => {
    child.stdout.on("data", (d: Buffer) => {
      out += d.toString();
      if (out.startsWith("ready\n")) resolve({ child, result });
    });
    child.on("exit", () => reject(new Error(`migrator exited before it was ready: ${err}`)));
  });
}

describe("migrations", () => {
  const t = useStateManager("migrations");

  it("records applied migrations in the ledger and applies nothing the second time", async () => {
    const names = listMigrations().map((m) => m.name);
    assert.ok(names.includes("0001_init"));
    const ledger = await t.sql<{ name: string }>(`select name from schema_migrations order by name`);
    assert.deepEqual(
      ledger.map((r) => r.name),
      names,
    );
    assert.deepEqual(await t.sm.migrate(), []);
  });

  it("applies each migration once when two processes migrate one schema at the same moment", async function () {
    this.timeout(60_000);
    const schema = uniqueSchemaName("concurrent_migrate");
    try {
      const migrators = await Promise.all([startMigrator(schema), startMigrator(schema)]);
      for (const m of migrators) m.child.stdin.write("go\n");
      const results = await Promise.all(migrators.map((m) => m.result));
      const all = listMigrations().map((m) => m.name);
      assert.deepEqual(
        [...results[0]!, ...results[1]!].sort(),
        all,
        `each applied by exactly one: ${JSON.stringify(results)}`,
      );
      const db = await openDatabase({ databaseUrl: databaseUrl(), schema });
      try {
        const { rows } = await db.pool.query<{ n: number }>(
          `select count(*)::int as n from schema_migrations`,
        );
        assert.equal(rows[0]?.n, all.length);
      } finally {
        await db.close();
      }
    } finally {
      await dropSchema(schema);
    }
  });

  it("keeps each function's live definition in sql/functions/, applied once and again when it changes", async () => {
    const files = listFunctions();
    const ledger = await t.sql<{ name: string; checksum: string; applied_at: Date }>(
      `select name, checksum, applied_at from schema_functions order by name`,
    );
    assert.deepEqual(
      ledger.map((r) => [r.name, r.checksum]),
      files.map((f) => [f.name, f.checksum]),
    );
    // What the server runs is the file's body, whatever a migration defined before.
    for (const f of files) {
      const rows = await t.sql<{ src: string }>(
        `select prosrc as src from pg_proc where proname = $1 and pronamespace = current_schema()::regnamespace`,
        [f.name],
      );
      assert.equal(rows.length, 1, `one ${f.name}()`);
      assert.ok(
        f.sql.includes(rows[0]!.src.trim()),
        `${f.name}() runs the body in sql/functions/${f.name}.sql`,
      );
    }
    await t.sm.migrate();
    const again = await t.sql<{ name: string; applied_at: Date }>(
      `select name, applied_at from schema_functions order by name`,
    );
    assert.deepEqual(
      again,
      ledger.map(({ name, applied_at }) => ({ name, applied_at })),
      "unchanged files are not re-applied",
    );
    // A definition recorded under another checksum (its file changed since) is applied again.
    await t.sql(`update schema_functions set checksum = 'changed' where name = 'step_inputs'`);
    await t.sm.migrate();
    const [row] = await t.sql<{ checksum: string }>(
      `select checksum from schema_functions where name = 'step_inputs'`,
    );
    assert.equal(row?.checksum, files.find((f) => f.name === "step_inputs")?.checksum);
  });

  it("fails when a released migration changes, and keeps function bodies out of new ones", () => {
    const released = new Map(
      readFileSync(new URL("../../sql/migrations/SHA256SUMS", import.meta.url), "utf8")
        .trim()
        .split("\n")
        .map((line) => {
          const [sum, file] = line.split(/\s+/);
          return [file?.replace(/\.sql$/, ""), sum] as const;
        }),
    );
    for (const m of listMigrations()) {
      const sum = released.get(m.name);
      assert.ok(
        sum !== undefined,
        `sql/migrations/${m.name}.sql is not in sql/migrations/SHA256SUMS: once it is final, add it with \`sha256sum ${m.name}.sql >> SHA256SUMS\``,
      );
      assert.equal(
        m.checksum,
        sum,
        `sql/migrations/${m.name}.sql changed after its release; migrations are forward-only: restore it and add a new one`,
      );
      // Migrations up to 0008 were released with function bodies; later ones keep them in sql/functions/.
      if (Number(m.name.slice(0, 4)) > 8) {
        assert.doesNotMatch(
          m.sql,
          /create\s+(or\s+replace\s+)?function/i,
          `${m.name}: define functions in sql/functions/<name>.sql; a migration only drops one whose signature changes`,
        );
      }
    }
  });

  it("refuses schema names that are not plain identifiers", async () => {
    for (const bad of ["Public", "a-b", "x; drop table tasks", "", "1abc", "a".repeat(64)]) {
      assert.throws(() => assertIdentifier(bad, "schema"), /not a plain SQL identifier/);
      await assert.rejects(
        openDatabase({ databaseUrl: databaseUrl(), schema: bad }),
        /not a plain SQL identifier/,
      );
    }
  });

  it("allows exactly the state vocabulary of protocol/constants.ts", async () => {
    const defs = await t.sql<{ name: string; def: string }>(
      `select conname as name, pg_get_constraintdef(oid) as def from pg_constraint
       where conname in ('steps_state_check', 'tasks_state_check') and connamespace = current_schema()::regnamespace`,
    );
    const quoted = (def: string | undefined): string[] =>
      [...(def ?? "").matchAll(/'([a-z_]+)'/g)].map((m) => m[1] ?? "").sort();
    assert.deepEqual(
      quoted(defs.find((d) => d.name === "steps_state_check")?.def),
      Object.values(StepStates).sort(),
    );
    assert.deepEqual(
      quoted(defs.find((d) => d.name === "tasks_state_check")?.def),
      Object.values(TaskStates).sort(),
    );
  });

  it("enforces in SQL the same legal moves as broker/state/transitions.ts", async () => {
    const triggers = await t.sql<{ name: string; def: string }>(
      `select tgname as name, pg_get_triggerdef(t.oid) as def from pg_trigger t
       where tgname in ('steps_legal_moves', 'tasks_legal_moves') and tgrelid::regclass::text in ('steps', 'tasks')`,
    );
    const moves = (def: string | undefined): string[] =>
      [...(def ?? "").matchAll(/'([a-z_]+>[a-z_]+)'/g)].map((m) => m[1] ?? "").sort();
    const expected = (table: Readonly<Record<string, readonly string[]>>): string[] =>
      Object.entries(table)
        .flatMap(([from, tos]) => tos.map((to) => `${from}>${to}`))
        .sort();
    assert.deepEqual(moves(triggers.find((r) => r.name === "steps_legal_moves")?.def), expected(STEP_MOVES));
    assert.deepEqual(moves(triggers.find((r) => r.name === "tasks_legal_moves")?.def), expected(TASK_MOVES));
  });

  it("rejects an illegal move and a rewrite of history at the table", async () => {
    const [tpl] = await t.sql<{ id: number }>(
      `insert into task_templates (namespace, name, version, definition) values ('m', 'm', '1', '{}') returning id`,
    );
    const [task] = await t
      .sql<{ id: string }>(
        `insert into tasks (id, template_id, state, context) values (gen_random_uuid(), $1, 'complete', '{}') returning id`,
        [tpl?.id],
      )
      .catch(() => [undefined]);
    assert.equal(task, undefined, "a finished task needs finished_at");
    const [done] = await t.sql<{ id: string }>(
      `insert into tasks (id, template_id, state, context, finished_at) values (gen_random_uuid(), $1, 'complete', '{}', now()) returning id`,
      [tpl?.id],
    );
    await assert.rejects(
      t.sql(`update tasks set state = 'pending', finished_at = null where id = $1`, [done?.id]),
      /illegal task state move complete -> pending/,
    );
    await t.sql(
      `insert into task_transitions (task_id, to_state, event, sort_key) values ($1, 'complete', 'x', 1)`,
      [done?.id],
    );
    // history is insert-only: no column of a transition or an attempt may change
    await assert.rejects(
      t.sql(`update task_transitions set event = 'y' where task_id = $1`, [done?.id]),
      /append-only/,
    );
    await assert.rejects(
      t.sql(`update task_transitions set created_at = created_at where task_id = $1`, [done?.id]),
      /append-only/,
    );
    await assert.rejects(
      t.sql(
        `insert into task_transitions (task_id, to_state, event, sort_key, created_at)
         select task_id, to_state, event, sort_key, created_at from task_transitions where task_id = $1`,
        [done?.id],
      ),
      /task_transitions_.*pkey|duplicate key/,
      "a second transition with the same sort key in one partition",
    );

    // A pending step may go straight to in_progress (readied and claimed in one update) only once
    // no parent is unfinished.
    const [running] = await t.sql<{ id: string }>(
      `insert into tasks (id, template_id, state, context) values (gen_random_uuid(), $1, 'in_progress', '{}') returning id`,
      [tpl?.id],
    );
    const [waiting] = await t.sql<{ id: string }>(
      `insert into steps (id, task_id, position, name, handler, config, state, max_attempts, retryable,
                          backoff_initial_ms, backoff_multiplier, backoff_max_ms, backoff_jitter, timeout_ms, pending_parents)
       values (gen_random_uuid(), $1, 0, 's', 'h', '{}', 'pending', 1, true, 0, 1, 0, 0, 1000, 1) returning id`,
      [running?.id],
    );
    const claim = `update steps set state = 'in_progress', pending_parents = $2, lease_attempt_id = gen_random_uuid(),
                   lease_started_at = now(), lease_expires_at = now() + interval '1 minute' where id = $1`;
    await assert.rejects(t.sql(claim, [waiting?.id, 1]), /steps_in_progress_has_no_pending_parents/);
    await t.sql(claim, [waiting?.id, 0]);
  });
});
