/**
 * A CHECKPOINT right before each measured phase. PostgreSQL checkpoints every
 * max_wal_size of WAL, and after a checkpoint the first change to each page
 * writes the whole page to the WAL; a phase that ran after others (which wrote
 * hundreds of megabytes) used to pay for their WAL, and measured 15% slower
 * than the same work run first. Starting each phase from a checkpoint gives
 * every system the same start, whatever ran before it.
 */
export interface Queryable {
  query(sql: string): Promise<unknown>;
}

/** CHECKPOINT needs superuser or pg_checkpoint; without it the phase starts as it is, and the log says so. */
export async function startFromCheckpoint(db: Queryable, log: (line: string) => void): Promise<void> {
  try {
    await db.query("checkpoint");
  } catch (err) {
    log(
      `no checkpoint before this phase (${err instanceof Error ? err.message : String(err)}); its figure may carry earlier phases' WAL`,
    );
  }
}
