-- Creates the UTC-day history partitions from today through $1 days ahead, moving the default partition's rows of those days (ensure_history_partitions() in sql/functions).
-- $1 int days ahead (0..366). Returns one row per partition created: parent_table, partition_name, range_from, range_to, moved_rows.
select * from ensure_history_partitions($1::int)
