/**
 * The SQL the state manager runs, one statement per file in sql/queries/,
 * each opening with a two-line contract comment (what it does; what $1..$n are).
 * Files are read once, on first use, and run as named prepared statements.
 */
import { readdirSync, readFileSync } from "node:fs";

const QUERY_DIR = new URL("../../sql/queries/", import.meta.url);

export const QUERY_NAMES = [
  "adopt_attempts",
  "cancel_task",
  "claim_steps",
  "complete_attempts",
  "create_tasks",
  "delete_finished_tasks",
  "ensure_history_partitions",
  "extend_leases",
  "finalize_tasks",
  "find_tasks_by_idempotency_key",
  "foreign_attempts",
  "get_attempts",
  "get_steps",
  "get_tasks",
  "get_template",
  "get_transitions",
  "heartbeat_broker",
  "insert_template",
  "list_brokers",
  "list_history_partitions",
  "list_tasks",
  "list_templates",
  "lock_dead_leases",
  "lock_expired",
  "lock_leases_of",
  "lock_orphans",
  "lock_task",
  "lock_tasks_of_attempts",
  "notify_events",
  "oldest_task",
  "prune_history_partitions",
  "queue_depth",
  "register_broker",
  "requeue_attempts",
  "resolve_step",
  "retry_steps",
  "set_history_drop_below",
  "stop_broker",
  "take_pool_session",
  "throughput",
] as const;
export type QueryName = (typeof QUERY_NAMES)[number];

export interface Query {
  readonly name: string;
  readonly text: string;
}

let cache: Readonly<Record<QueryName, Query>> | undefined;

export function loadQueries(): Readonly<Record<QueryName, Query>> {
  if (cache !== undefined) return cache;
  const files = new Set(readdirSync(QUERY_DIR).filter((f) => f.endsWith(".sql")));
  const loaded: Partial<Record<QueryName, Query>> = {};
  for (const name of QUERY_NAMES) {
    const file = `${name}.sql`;
    if (!files.delete(file)) throw new Error(`sql/queries/${file} is missing`);
    const text = readFileSync(new URL(file, QUERY_DIR), "utf8");
    const [first, second] = text.split("\n");
    if (!first?.startsWith("-- ") || !second?.startsWith("-- ")) {
      throw new Error(
        `sql/queries/${file} must open with a two-line contract comment (what it does; what $1..$n are)`,
      );
    }
    loaded[name] = { name: `stepbroker_${name}`, text };
  }
  if (files.size > 0) throw new Error(`sql/queries/ has files no code uses: ${[...files].join(", ")}`);
  cache = loaded as Record<QueryName, Query>;
  return cache;
}
