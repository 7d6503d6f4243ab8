/**
 * withTransaction on a connection that dies while it is checked out (a
 * PostgreSQL restart, a terminated backend): the transaction fails with its
 * label and the process lives on, and the pool keeps serving.
 */
import { strict as assert } from "node:assert";
import { withTransaction } from "../../broker/db/transaction";
import { silentLogger } from "../../broker/db/logger";
import { useStateManager } from "../support/db";

describe("withTransaction when its connection dies", function () {
  this.timeout(30_000);
  const t = useStateManager("transaction");

  it("rejects with its label instead of crashing the process, and the pool serves the next query", async () => {
    const pool = t.db.pool;
    const failed = await withTransaction(pool, "doomed work", silentLogger, async (client) => {
      const { rows } = await client.query<{ pid: number }>("select pg_backend_pid() as pid");
      // the backend is terminated from another connection while this one waits on the server
      const waiting = client.query("select pg_sleep(10)");
      await pool.query("select pg_terminate_backend($1)", [rows[0]!.pid]);
      await waiting;
    }).then(
      () => undefined,
      (e: unknown) => e,
    );
    assert.ok(failed instanceof Error, "the transaction failed");
    assert.equal(failed.message, "doomed work failed");
    // the client's "error" event arrives after the socket closes: give it the chance to be unhandled
    await new Promise((r) => setTimeout(r, 200));
    const { rows } = await pool.query<{ one: number }>("select 1 as one");
    assert.equal(rows[0]!.one, 1);
  });
});
