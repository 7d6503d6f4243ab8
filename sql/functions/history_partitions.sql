-- history_partitions: Every partition of the history tables (step_transitions, task_transitions, step_attempts), with its range and a row estimate.
-- () -> table (parent_table, partition_name, range_from, range_to, is_default, rows_estimate); range_from null: from minvalue; both null: the default partition.
-- Live definition: applied after the numbered migrations whenever this file changes (broker/db/migrate.ts); the tables are partitioned by migration 0013.
--
-- Ranges are read from the catalog (pg_get_expr of relpartbound), never from a partition's name:
-- the _legacy partition ends at the UTC midnight after 0013 ran, and an operator may have made
-- partitions of other widths. A bound is printed with its UTC offset, so the cast back is exact
-- whatever the session's TimeZone. rows_estimate is the planner's count (reltuples) once the
-- table was analyzed, before that the statistics collector's live-row count; null if neither.
create or replace function history_partitions()
returns table (
  parent_table text,
  partition_name text,
  range_from timestamptz,
  range_to timestamptz,
  is_default boolean,
  rows_estimate bigint
)
language sql stable
as $$
  select p.relname::text,
         c.relname::text,
         case when b.m[1] is null or b.m[1] = 'MINVALUE' then null else trim(both '''' from b.m[1])::timestamptz end,
         case when b.m[2] is null or b.m[2] = 'MAXVALUE' then null else trim(both '''' from b.m[2])::timestamptz end,
         b.expr = 'DEFAULT',
         case when c.reltuples >= 0 then c.reltuples::bigint else s.n_live_tup end
  from pg_class p
  join pg_inherits i on i.inhparent = p.oid
  join pg_class c on c.oid = i.inhrelid
  left join pg_stat_user_tables s on s.relid = c.oid
  cross join lateral (select pg_get_expr(c.relpartbound, c.oid) as expr) e
  cross join lateral (select e.expr, regexp_match(e.expr, '^FOR VALUES FROM \((.*)\) TO \((.*)\)$') as m) b
  where p.relnamespace = current_schema()::regnamespace
    and p.relname in ('step_transitions', 'task_transitions', 'step_attempts')
  order by p.relname, b.expr = 'DEFAULT', 3 nulls first
$$;
