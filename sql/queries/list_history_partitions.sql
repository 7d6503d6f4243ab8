-- Every partition of the history tables with its range and row estimate (history_partitions() in sql/functions).
-- No parameters. Returns one row per partition, by parent table then range, the default partition last.
select * from history_partitions()
