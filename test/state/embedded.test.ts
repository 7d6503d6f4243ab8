import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { openDatabase } from "../../broker/db/openDatabase";

describe("embedded PostgreSQL", () => {
  let dir: string;

  before(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), "stepbroker-embedded-"));
  });
  after(async () => {
    await fs.rm(dir, { recursive: true, force: true });
  });

  it("initialises a data directory once, reuses it, and survives a stale postmaster.pid", async function () {
    this.timeout(120_000);
    const dataDir = path.join(dir, "nested", "pgdata");
    // databaseUrl "" ignores any DATABASE_URL of the test run: start our own server
    const first = await openDatabase({ databaseUrl: "", dataDir, schema: "embedded_test" });
    try {
      assert.equal(first.embedded, true);
      assert.ok(existsSync(path.join(dataDir, "PG_VERSION")));
      await first.pool.query(`create schema embedded_test`);
      await first.pool.query(`create table kept (v text)`);
      await first.pool.query(`insert into kept values ('from the first run')`);
    } finally {
      await first.close();
    }
    assert.equal(existsSync(path.join(dataDir, "postmaster.pid")), false, "stopped cleanly");

    // a killed run leaves its pid file behind; that process no longer exists
    const gone = spawnSync(process.execPath, ["-e", "process.exit(0)"]).pid ?? 999_999;
    await fs.writeFile(path.join(dataDir, "postmaster.pid"), `${gone}\n${dataDir}\n`);

    const second = await openDatabase({ databaseUrl: "", dataDir, schema: "embedded_test" });
    try {
      const { rows } = await second.pool.query<{ v: string }>(`select v from kept`);
      assert.deepEqual(
        rows,
        [{ v: "from the first run" }],
        "the data directory was reused, not initialised again",
      );
    } finally {
      await second.close();
    }
  });
});
