/**
 * The history tables' partitions (migration 0013: step_transitions and
 * task_transitions by created_at, step_attempts by finished_at, in UTC days):
 * creating them ahead of time, listing them, and retention by dropping them.
 *
 * What the broker's maintenance calls (Maintenance.historyTick): ensure() at
 * start and every partitionCheckMs (1 h), so each day's partitions exist
 * `daysAhead` (3) days before their first row; prune() on the same tick when
 * historyRetentionDays is set. `stepbroker history partitions` lists them and
 * `stepbroker history prune --before` prunes by hand.
 *
 * Retention never DELETEs history rows in bulk. prune() deletes the finished
 * tasks older than the cutoff, in batches of its own transactions, and then
 * drops whole partitions that end by the cutoff and before the oldest task
 * still present (the rule is stated in sql/functions/prune_history_partitions.sql).
 * While it deletes, the delete triggers leave the rows of partitions that end
 * by the cutoff to the drop. When a running (or recently finished) old task
 * holds the drop back, the rows of the tasks deleted meanwhile stay in those
 * partitions, unreachable (no task names them), until it goes and they drop.
 */
import type { StateSql } from "./StateSql";
import { iso } from "./rows";

/** Most finished tasks one delete statement of prune() takes, so no transaction grows with the backlog. */
export const PRUNE_BATCH = 1000;

/** One partition of a history table, as the catalog says. */
export interface HistoryPartition {
  parentTable: string;
  partitionName: string;
  /** ISO time; null: from minvalue (the _legacy partition), or the default partition. */
  rangeFrom: string | null;
  /** ISO time, exclusive; null for the default partition. */
  rangeTo: string | null;
  isDefault: boolean;
  /** The planner's row count, or the statistics collector's before the first analyze; null when neither knows. */
  rowsEstimate: number | null;
}

/** A partition ensure() created, and how many rows it took over from the default partition. */
export interface CreatedPartition {
  parentTable: string;
  partitionName: string;
  rangeFrom: string;
  rangeTo: string;
  movedRows: number;
}

export interface PruneResult {
  /** The cutoff asked for (ISO). */
  before: string;
  /** Finished tasks deleted (finished before the cutoff), with their steps. */
  deletedTasks: number;
  dropped: HistoryPartition[];
  /**
   * Partitions that end by the cutoff yet stay, and the oldest task still
   * present that holds them (it has, or may have, history there); null when
   * nothing before the cutoff is left.
   */
  heldBack: { partitions: number; taskId: string; state: string; createdAt: string } | null;
}

interface PartitionRow {
  parent_table: string;
  partition_name: string;
  range_from: Date | null;
  range_to: Date | null;
  is_default: boolean;
  rows_estimate: string | null;
}

function partitionOf(r: PartitionRow): HistoryPartition {
  return {
    parentTable: r.parent_table,
    partitionName: r.partition_name,
    rangeFrom: r.range_from ? iso(r.range_from) : null,
    rangeTo: r.range_to ? iso(r.range_to) : null,
    isDefault: r.is_default,
    rowsEstimate: r.rows_estimate === null ? null : Number(r.rows_estimate),
  };
}

export class HistoryPartitions {
  constructor(private readonly sql: StateSql) {}

  /** Creates the day partitions from today through `daysAhead` days ahead that do not exist yet; returns those created. */
  async ensure(daysAhead: number): Promise<CreatedPartition[]> {
    if (!Number.isInteger(daysAhead) || daysAhead < 0 || daysAhead > 366)
      throw new RangeError(`days ahead must be an integer from 0 to 366, not ${daysAhead}`);
    const rows = await this.sql.run<{
      parent_table: string;
      partition_name: string;
      range_from: Date;
      range_to: Date;
      moved_rows: string;
    }>("ensure_history_partitions", [daysAhead]);
    return rows.map((r) => ({
      parentTable: r.parent_table,
      partitionName: r.partition_name,
      rangeFrom: iso(r.range_from),
      rangeTo: iso(r.range_to),
      movedRows: Number(r.moved_rows),
    }));
  }

  /** Every partition of the three history tables, by table then range, each table's default last. */
  async list(): Promise<HistoryPartition[]> {
    return (await this.sql.run<PartitionRow>("list_history_partitions", [])).map(partitionOf);
  }

  /** Retention up to `before` (see the file's comment); safe to run from several brokers at once. */
  async prune(before: Date, options: { batch?: number } = {}): Promise<PruneResult> {
    if (Number.isNaN(before.getTime())) throw new RangeError("the cutoff is not a valid time");
    const batch = options.batch ?? PRUNE_BATCH;
    let deletedTasks = 0;
    for (;;) {
      const gone = await this.sql.transaction("delete finished tasks", async (client) => {
        await this.sql.runIn(client, "set_history_drop_below", [before]);
        return (await this.sql.runIn<{ id: string }>(client, "delete_finished_tasks", [before, batch]))
          .length;
      });
      deletedTasks += gone;
      if (gone < batch) break;
    }
    const dropped = (await this.sql.run<PartitionRow>("prune_history_partitions", [before])).map(partitionOf);
    // What still ends by the cutoff (an hour ago at the latest, as the function's bound) was held back.
    const bound = Math.min(before.getTime(), Date.now() - 3_600_000);
    const left = (await this.list()).filter(
      (p) => !p.isDefault && p.rangeTo !== null && Date.parse(p.rangeTo) <= bound,
    );
    let heldBack: PruneResult["heldBack"] = null;
    if (left.length > 0) {
      const [oldest] = await this.sql.run<{ id: string; state: string; created_at: Date }>("oldest_task", []);
      if (oldest)
        heldBack = {
          partitions: left.length,
          taskId: oldest.id,
          state: oldest.state,
          createdAt: iso(oldest.created_at),
        };
    }
    return { before: before.toISOString(), deletedTasks, dropped, heldBack };
  }
}

/**
 * A cutoff as an operator writes it: `Nd` (N days before `now`) or an ISO
 * date or time (a date alone is its UTC midnight).
 */
export function parseCutoff(text: string, now: Date = new Date()): Date {
  const days = /^(\d+)d$/.exec(text.trim());
  if (days) return new Date(now.getTime() - Number(days[1]) * 86_400_000);
  if (/^\d{4}-\d{2}-\d{2}([T ][0-9:.]+(Z|[+-]\d{2}:?\d{2})?)?$/.test(text.trim())) {
    const at = new Date(text.trim());
    if (!Number.isNaN(at.getTime())) return at;
  }
  throw new RangeError(
    `cutoff ${JSON.stringify(text)} is neither Nd (e.g. 30d) nor an ISO date or time (e.g. 2026-11-01)`,
  );
}

/** One line per partition, columns aligned, for `stepbroker history partitions`. */
export function formatPartitions(partitions: HistoryPartition[]): string {
  if (partitions.length === 0) return "no history partitions (is the database migrated?)";
  const width = Math.max(...partitions.map((p) => p.partitionName.length));
  return partitions
    .map((p) =>
      [
        p.partitionName.padEnd(width),
        p.isDefault
          ? "default".padEnd(53)
          : `${p.rangeFrom ?? "minvalue".padEnd(24)}  ${p.rangeTo}`.padEnd(53),
        p.rowsEstimate === null ? "rows unknown (not analyzed yet)" : `~${p.rowsEstimate} rows`,
      ].join("  "),
    )
    .join("\n");
}
