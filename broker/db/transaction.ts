import type pg from "pg";
import { coerceError, isRetryableTransactionError } from "./errors";
import type { Logger } from "./logger";

/** How many times a transaction that hit a deadlock or serialization failure is run again. */
const MAX_TRANSACTION_RUNS = 5;

/**
 * Runs `work` in one transaction on one pooled connection. A deadlock or
 * serialization failure rolls back everything, so the whole transaction is
 * simply run again (a few times). Any other error is wrapped with `{ cause }`
 * naming `label`.
 */
export async function withTransaction<T>(
  pool: pg.Pool,
  label: string,
  logger: Logger,
  work: (client: pg.PoolClient) => Promise<T>,
): Promise<T> {
  for (let run = 1; ; run++) {
    const client = await pool.connect();
    let broken: Error | undefined;
    // pg-pool listens for a connection's death only while it is idle: a server restart or a
    // terminated backend while checked out emits "error" on the client, which with no listener
    // kills the process. The query in flight rejects as well, so noting it here is enough.
    const onLost = (err: Error): void => {
      broken ??= err;
    };
    client.on("error", onLost);
    try {
      await client.query("BEGIN");
      const result = await work(client);
      await client.query("COMMIT");
      return result;
    } catch (thrown) {
      try {
        await client.query("ROLLBACK");
      } catch (rollbackFailure) {
        // the connection is unusable: destroy it rather than return it to the pool
        broken = coerceError(rollbackFailure);
      }
      if (isRetryableTransactionError(thrown) && run < MAX_TRANSACTION_RUNS) {
        logger.debug({ err: coerceError(thrown), label, run }, "transaction conflicted; running it again");
        continue;
      }
      throw new Error(`${label} failed`, { cause: thrown });
    } finally {
      client.off("error", onLost);
      client.release(broken);
    }
  }
}

/** One statement on any pooled connection (atomic by itself), run again on deadlock. */
export async function runStatement<R extends pg.QueryResultRow>(
  pool: pg.Pool,
  label: string,
  query: pg.QueryConfig,
): Promise<pg.QueryResult<R>> {
  for (let run = 1; ; run++) {
    try {
      return await pool.query<R>(query);
    } catch (thrown) {
      if (isRetryableTransactionError(thrown) && run < MAX_TRANSACTION_RUNS) continue;
      throw new Error(`${label} failed`, { cause: thrown });
    }
  }
}
