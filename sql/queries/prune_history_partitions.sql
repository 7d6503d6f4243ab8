-- Detaches and drops the history partitions that end at or before $1 and before the oldest task still present (prune_history_partitions() in sql/functions).
-- $1 timestamptz cutoff. Returns one row per partition dropped: parent_table, partition_name, range_from, range_to, rows_estimate.
select * from prune_history_partitions($1::timestamptz)
