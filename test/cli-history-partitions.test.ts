/**
 * `stepbroker history partitions` and `stepbroker history prune`, run as a
 * person would: the real CLI process on a real PostgreSQL schema of its own.
 */
import { strict as assert } from "node:assert";
import type { HistoryPartition, PruneResult } from "../broker/state/HistoryPartitions";
import { StateManager } from "../broker/state/StateManager";
import { databaseUrl, dropSchema, uniqueSchemaName } from "./support/db";
import { runAll, runCli as cli } from "./support/runCli";

function daySuffix(offset: number): string {
  return new Date(Date.now() + offset * 86_400_000).toISOString().slice(0, 10).replaceAll("-", "");
}

describe("the stepbroker CLI: history partitions and prune", function () {
  this.timeout(60_000);
  const schema = uniqueSchemaName("cli_hpart");
  const env: NodeJS.ProcessEnv = { STEPBROKER_LOG_LEVEL: "warn" };
  before(async () => {
    env.DATABASE_URL = databaseUrl();
    const sm = await StateManager.open({ databaseUrl: databaseUrl(), schema });
    try {
      await sm.ensureHistoryPartitions(2);
      await sm.db.pool.query(
        `insert into task_transitions (task_id, to_state, event, sort_key, created_at)
         values (gen_random_uuid(), 'pending', 'created', 1, now() + interval '1 day')`,
      );
      await sm.db.pool.query(`analyze task_transitions`);
    } finally {
      await sm.close();
    }
  });
  after(async () => await dropSchema(schema));

  it("lists every partition with its range and a row estimate, as text and as JSON", async () => {
    const [text, json] = await runAll([
      () => cli(["history", "partitions", "--schema", schema], env),
      () => cli(["history", "partitions", "--schema", schema, "--json"], env),
    ]);
    assert.equal(text.code, 0, text.stderr);
    const lines = text.stdout.trim().split("\n");
    assert.equal(lines.length, 3 * 4, text.stdout);
    assert.match(
      lines.find((l) => l.startsWith("task_transitions_legacy")) ?? "",
      /minvalue +\d{4}-\d\d-\d\dT00:00:00\.000Z/,
    );
    assert.match(lines.find((l) => l.startsWith("task_transitions_default")) ?? "", /default/);
    assert.match(lines.find((l) => l.startsWith(`task_transitions_p${daySuffix(1)}`)) ?? "", /~1 rows/);

    assert.equal(json.code, 0, json.stderr);
    const rows = JSON.parse(json.stdout) as HistoryPartition[];
    const day = rows.find((r) => r.partitionName === `task_transitions_p${daySuffix(1)}`);
    assert.ok(day);
    assert.equal(day.parentTable, "task_transitions");
    assert.equal(day.isDefault, false);
    assert.equal(day.rowsEstimate, 1);
    assert.equal(Date.parse(day.rangeTo!) - Date.parse(day.rangeFrom!), 86_400_000);
  });

  it("prunes by a cutoff in days, and says what it did", async () => {
    const r = await cli(["history", "prune", "--before", "30d", "--schema", schema, "--json"], env);
    assert.equal(r.code, 0, r.stderr);
    const out = JSON.parse(r.stdout) as PruneResult;
    assert.equal(out.deletedTasks, 0);
    assert.deepEqual(out.dropped, [], "nothing in a fresh schema is 30 days old");
    const text = await cli(["history", "prune", "--before", "2026-01-01", "--schema", schema], env);
    assert.equal(text.code, 0, text.stderr);
    assert.match(
      text.stdout,
      /^deleted 0 tasks finished before 2026-01-01T00:00:00\.000Z; dropped 0 history partitions$/m,
    );
  });

  it("refuses a prune without a cutoff, or with one it cannot read, in one line", async () => {
    const [none, bad] = await runAll([
      () => cli(["history", "prune", "--schema", schema], env),
      () => cli(["history", "prune", "--before", "last week", "--schema", schema], env),
    ]);
    assert.equal(none.code, 64);
    assert.match(none.stderr.trim(), /^stepbroker: history prune needs --before <ISO date \| Nd>/);
    assert.equal(bad.code, 2);
    assert.match(bad.stderr.trim(), /^stepbroker: --before: cutoff "last week" is neither Nd/);
    assert.equal(bad.stderr.trim().split("\n").length, 1);
  });
});
