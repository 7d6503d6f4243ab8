-- prune_history_partitions: Detaches and drops every history partition that ends at or before the cutoff and holds no history of a task still present.
-- (p_before timestamptz) -> table (parent_table, partition_name, range_from, range_to, rows_estimate): the partitions dropped.
-- Live definition: applied after the numbered migrations whenever this file changes (broker/db/migrate.ts); the tables are partitioned by migration 0013.
--
-- Retention drops whole partitions, never a mass DELETE of history rows. The rule: a partition
-- may go when its upper bound is at or before the drop bound, the earliest of
--   - p_before, the operator's cutoff;
--   - the created_at of the oldest task still in `tasks`, finished or not: every history row of
--     a task is written at or after the task's creation (its transitions, and its attempts,
--     inserted when they end), so no present task has a row below it;
--   - an hour ago: a task whose creating transaction is still open is not in `tasks` yet, but
--     its rows already carry that transaction's start time.
-- The caller first deletes the finished tasks older than the cutoff (HistoryPartitions.prune, in
-- bounded batches); what then still holds the bound back is a task that is running or finished
-- after the cutoff, and its partitions stay until it goes. The _legacy partition goes by the
-- same rule once its bound is passed; the default partition never goes (ensure_history_partitions
-- moves its rows into day partitions). Same advisory lock as ensure_history_partitions.
--
-- Detaching without CONCURRENTLY (not allowed beside a default partition, nor in a transaction)
-- takes ACCESS EXCLUSIVE on the parent, briefly, and every write of that history table waits
-- behind it: lock_timeout (1 s unless the caller set one) bounds the stall, and a call that times
-- out fails whole, to be tried again on the next tick.
create or replace function prune_history_partitions(p_before timestamptz)
returns table (
  parent_table text,
  partition_name text,
  range_from timestamptz,
  range_to timestamptz,
  rows_estimate bigint
)
language plpgsql volatile
as $$
declare
  v_bound timestamptz;
  v_part record;
begin
  if p_before is null then
    raise exception 'the cutoff must not be null' using errcode = 'invalid_parameter_value';
  end if;
  perform pg_advisory_xact_lock(hashtext('stepbroker.history_partitions'), hashtext(current_schema()));
  if current_setting('lock_timeout') in ('0', '0ms') then
    perform set_config('lock_timeout', '1s', true);
  end if;
  v_bound := least(p_before, now() - interval '1 hour', (select min(t.created_at) from tasks t));
  for v_part in
    select h.* from history_partitions() h
    where not h.is_default and h.range_to <= v_bound
    order by h.range_to, h.parent_table
  loop
    execute format('alter table %I detach partition %I', v_part.parent_table, v_part.partition_name);
    execute format('drop table %I', v_part.partition_name);
    parent_table := v_part.parent_table;
    partition_name := v_part.partition_name;
    range_from := v_part.range_from;
    range_to := v_part.range_to;
    rows_estimate := v_part.rows_estimate;
    return next;
  end loop;
end
$$;
