-- ensure_history_partitions: Creates the UTC-day partitions <table>_pYYYYMMDD of the three history tables from today through p_days_ahead days ahead.
-- (p_days_ahead integer, 0..366) -> table (parent_table, partition_name, range_from, range_to, moved_rows): the partitions this call created.
-- Live definition: applied after the numbered migrations whenever this file changes (broker/db/migrate.ts); the tables are partitioned by migration 0013.
--
-- The broker calls it at start and every hour (Maintenance), so the partition a row belongs to
-- exists days before its first row. Days another partition already covers, in part or whole (the
-- _legacy one up to its bound, or one an operator made), are skipped: bounds come from the catalog
-- (history_partitions()), so no "already exists" error is ever caught.
--
-- The default partition: it takes what no partition covers (a broker down past the days it made).
-- Attaching a day while the default holds rows of that day would fail, and rows left there could
-- never be dropped by retention, so every day the default holds rows of is created too (past days
-- included), and those rows move into it in this transaction: deleted from the default and
-- inserted into the new table before it is attached. The default then is empty again, and the
-- attach's own check of it (PostgreSQL scans the default for rows of the new range) finds none.
--
-- Locks: each day is a plain table attached with ATTACH PARTITION, which takes SHARE UPDATE
-- EXCLUSIVE on the parent (writes and reads of other partitions go on) and ACCESS EXCLUSIVE on the
-- new table and on the default partition, briefly. A reader of the whole table (a task's history)
-- holds the default, and the attach waits for it while queueing those after it: lock_timeout (1 s
-- unless the caller set one) bounds that stall; a call that times out fails whole, and with the
-- days made 3 ahead and a try every hour, it has dozens of chances before a day is needed. Two
-- callers at once (two brokers) take turns on an advisory lock, and the second finds the first
-- one's partitions in the catalog.
create or replace function ensure_history_partitions(p_days_ahead integer)
returns table (
  parent_table text,
  partition_name text,
  range_from timestamptz,
  range_to timestamptz,
  moved_rows bigint
)
language plpgsql volatile
as $$
declare
  v_today date := (now() at time zone 'UTC')::date;
  v_parent text;
  v_key text;
  v_days date[];
  v_day date;
  v_name text;
  v_from timestamptz;
  v_to timestamptz;
  v_moved bigint;
begin
  if p_days_ahead is null or p_days_ahead < 0 or p_days_ahead > 366 then
    raise exception 'days ahead must be 0 to 366, not %', coalesce(p_days_ahead::text, 'null')
      using errcode = 'invalid_parameter_value';
  end if;
  perform pg_advisory_xact_lock(hashtext('stepbroker.history_partitions'), hashtext(current_schema()));
  if current_setting('lock_timeout') in ('0', '0ms') then
    perform set_config('lock_timeout', '1s', true);
  end if;
  foreach v_parent in array array['step_transitions', 'task_transitions', 'step_attempts'] loop
    v_key := case v_parent when 'step_attempts' then 'finished_at' else 'created_at' end;
    execute format('select array_agg(distinct (%I at time zone ''UTC'')::date) from %I', v_key, v_parent || '_default')
      into v_days;
    for v_day in
      select d from unnest(coalesce(v_days, '{}') || array(
               select g::date from generate_series(v_today, v_today + p_days_ahead, interval '1 day') g)) d
      group by d order by d
    loop
      v_from := v_day::timestamp at time zone 'UTC';
      v_to := (v_day + 1)::timestamp at time zone 'UTC';
      continue when exists (
        select 1 from history_partitions() h
        where h.parent_table = v_parent and not h.is_default
          and coalesce(h.range_from, '-infinity') < v_to and coalesce(h.range_to, 'infinity') > v_from);
      v_name := v_parent || '_p' || to_char(v_day, 'YYYYMMDD');
      if to_regclass(quote_ident(v_name)) is not null then
        raise exception 'table % exists but is not a partition of %', v_name, v_parent
          using errcode = 'duplicate_table',
                hint = format('attach it (alter table %I attach partition %I for values from (%L) to (%L)) or drop it',
                              v_parent, v_name, v_from, v_to);
      end if;
      execute format('create table %I (like %I including defaults including constraints)', v_name, v_parent);
      execute format(
        'with moved as (delete from %1$I where %2$I >= $1 and %2$I < $2 returning *) insert into %3$I select * from moved',
        v_parent || '_default', v_key, v_name) using v_from, v_to;
      get diagnostics v_moved = row_count;
      execute format('alter table %I attach partition %I for values from (%L) to (%L)', v_parent, v_name, v_from, v_to);
      parent_table := v_parent;
      partition_name := v_name;
      range_from := v_from;
      range_to := v_to;
      moved_rows := v_moved;
      return next;
    end loop;
  end loop;
end
$$;
