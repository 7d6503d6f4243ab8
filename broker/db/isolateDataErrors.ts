/**
 * Batches that PostgreSQL may refuse for one bad row (a value jsonb cannot
 * store that got past validation). Retrying the same batch would fail
 * forever and hold every row behind it, so the batch is run again in halves,
 * down to the single item at fault; its neighbours are stored. Both group
 * commits (results and new tasks) isolate their bad items this way.
 */
import { coerceError, isDataError } from "./errors";

export interface Isolation<T> {
  /** Stores `part` in one statement; throws what the database said. */
  run(part: T[]): Promise<void>;
  /** PostgreSQL refused the data of `part` (more than one item), which is run again in halves. */
  halving(part: T[], err: Error): void;
  /**
   * PostgreSQL refused the data of this item alone. An error returned means
   * the database itself failed meanwhile: the isolation stops there, as for
   * any failure that is not about the data.
   */
  single(item: T, err: Error): Promise<Error | undefined>;
}

/** Where an isolation stopped: the database failed on `part`; `rest` was not run yet (both in order). */
export interface IsolationStop<T> {
  part: T[];
  rest: T[];
  err: Error;
}

/** Runs `items` through `how`; undefined when every item was dealt with. */
export async function isolateDataErrors<T>(
  items: T[],
  how: Isolation<T>,
): Promise<IsolationStop<T> | undefined> {
  // Parts still to run, the next one last.
  const work: T[][] = [items];
  while (work.length > 0) {
    const part = work.pop()!;
    try {
      await how.run(part);
      continue;
    } catch (e) {
      const err = coerceError(e);
      const stop = (at: Error): IsolationStop<T> => ({ part, rest: work.reverse().flat(), err: at });
      if (!isDataError(e)) return stop(err);
      if (part.length > 1) {
        how.halving(part, err);
        const mid = Math.ceil(part.length / 2);
        work.push(part.slice(mid), part.slice(0, mid));
        continue;
      }
      const gone = await how.single(part[0]!, err);
      if (gone) return stop(gone);
    }
  }
  return undefined;
}
