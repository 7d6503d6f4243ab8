/**
 * The write floor (bench/floor.ts) on a small run: every data model of
 * bench/floorModels.ts finishes its tasks with the rows a one-step task needs
 * (measureFloor checks them after each drain and throws otherwise), reports
 * its WAL per task, and drops its schema; the state manager runs beside them
 * on the migrated schema.
 */
import assert from "node:assert/strict";
import pg from "pg";
import { measureFloor } from "../../bench/floor";
import { floorModels } from "../../bench/floorModels";
import { databaseUrl } from "../support/db";

describe("bench: the write floor of each data model", function () {
  this.timeout(240_000);

  it("drains every model and the state manager, in interleaved rounds, leaving no schema behind", async () => {
    const r = await measureFloor({
      databaseUrl: databaseUrl(),
      tasks: 500,
      batch: 64,
      maxSeconds: 120,
      rounds: 2,
    });
    assert.deepEqual(
      r.variants.map((v) => v.name),
      floorModels.map((m) => m.name),
    );
    for (const v of r.variants) {
      assert.equal(v.runs.length, 2, v.name);
      for (const p of v.runs) {
        assert.equal(p.timedOut, false, v.name);
        assert.equal(p.steps, 500, v.name);
        assert.ok((p.walBytesPerStep ?? 0) > 0, `${v.name} reports its WAL`);
      }
    }
    assert.equal(r.variants[0]!.ratioToBefore, 1);
    assert.deepEqual(r.writeFloor, r.variants.find((v) => v.name === "floor_new")!.median);
    assert.equal(r.stateManager.steps, 500);
    // a model that updates no step column an index holds (the ready queue) is the one with HOT step updates
    const queue = r.variants.find((v) => v.name === "floor_new_ready_queue")!.median;
    assert.ok((queue.stepsHotRatio ?? 0) > 0, `ready-queue steps HOT ${queue.stepsHotRatio}`);
    assert.equal(r.variants.find((v) => v.name === "floor_new")!.median.stepsHotRatio, 0);

    const c = new pg.Client({ connectionString: databaseUrl() });
    await c.connect();
    try {
      const { rows } = await c.query(`select nspname from pg_namespace where nspname like 'bench\\_floor%'`);
      assert.deepEqual(rows, []);
    } finally {
      await c.end();
    }
  });
});
