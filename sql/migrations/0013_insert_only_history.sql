-- 0013_insert_only_history: history is insert-only; the running attempt lives on its step; history tables are partitioned by time.
-- Runs once, in a transaction under an advisory lock, with search_path set to the target schema. Never edit it once released.
--
-- Every change of state cost, besides the insert of its transition, an update of the previous
-- transition (its most_recent flag, under a partial unique index, so never a HOT update), and
-- every attempt cost an insert at the claim and an update at its end. Both were writes to rows
-- that history only ever needs once, and both kept the history tables' pages hot for updates
-- however large they grew.
--
-- 1. The step and task rows count their transitions. `history_seq` is bumped by the same UPDATE
--    that changes the row's state, and the transition written with it carries it as its sort_key:
--    the latest transition is the one whose sort_key equals the row's history_seq. The flag, its
--    index and the update-guard triggers that allowed only its flip go; nothing in history is
--    updated any more (the triggers below refuse every update).
alter table steps add column history_seq integer not null default 0;
alter table tasks add column history_seq integer not null default 0;
update steps s set history_seq = t.sort_key from step_transitions t where t.step_id = s.id and t.most_recent;
update tasks x set history_seq = t.sort_key from task_transitions t where t.task_id = x.id and t.most_recent;

drop trigger step_transitions_append_only on step_transitions;
drop trigger task_transitions_append_only on task_transitions;
drop trigger step_attempts_finished_are_final on step_attempts;
-- (drops step_transitions_most_recent and task_transitions_most_recent with them)
alter table step_transitions drop column most_recent;
alter table task_transitions drop column most_recent;
-- The surrogate `id` only ordered rows written in one transaction; readers order by time, then
-- by step position and sort_key, which says the same.
alter table step_transitions drop column id;
alter table task_transitions drop column id;

-- 2. An attempt is one row, inserted when it ends. While it runs it is the step's lease: the
--    attempt id, the broker holding it, the pool it was sent to and when it started. Running
--    attempts move there, and their rows go (their end will write them once, whole).
alter table steps add column lease_pool_id text, add column lease_started_at timestamptz;
update steps s set lease_pool_id = a.pool_id, lease_started_at = a.started_at
from step_attempts a
where a.attempt_id = s.lease_attempt_id;
update steps set lease_started_at = now() where lease_attempt_id is not null and lease_started_at is null;
delete from step_attempts where finished_at is null;
alter table steps drop constraint steps_lease_iff_in_progress;
alter table steps add constraint steps_lease_iff_in_progress check (
  (state = 'in_progress') = (lease_attempt_id is not null)
  and (lease_attempt_id is null) = (lease_expires_at is null)
  and (lease_attempt_id is null) = (lease_started_at is null)
);
-- Results, heartbeats and reapers name attempts: the step that runs one is found here. Only the
-- steps in flight have an entry.
create unique index steps_leased_attempt on steps (lease_attempt_id) where lease_attempt_id is not null;

-- 3. History tables are partitioned by the time their rows are written (transitions: created_at;
--    attempts: finished_at), in UTC days, so retention detaches and drops whole partitions and no
--    index of the hot path grows with history. The tables as they were become each parent's
--    `_legacy` partition, which also takes the rows written until the next UTC midnight; the
--    broker creates the daily partitions after that ahead of time (ensure_history_partitions,
--    sql/functions/). A `_default` partition takes any row no daily partition covers, so a
--    broker that was down past the partitions it made never fails a write.
--    A partitioned table's unique keys must hold the partition column: (step_id, sort_key) is
--    unique per partition by index, and across them because only the UPDATE that bumps the
--    row's history_seq, under its row lock, writes the transition with that sort_key.
alter table step_transitions rename to step_transitions_legacy;
alter table step_transitions_legacy drop constraint step_transitions_pkey;
alter table task_transitions rename to task_transitions_legacy;
alter table task_transitions_legacy drop constraint task_transitions_pkey;
alter table step_attempts rename to step_attempts_legacy;
alter table step_attempts_legacy drop constraint step_attempts_pkey;
alter index step_attempts_step rename to step_attempts_legacy_step;
alter table step_attempts_legacy alter column finished_at set not null, alter column outcome set not null;
alter table step_attempts_legacy drop constraint step_attempts_finished_iff_outcome;

create table step_transitions (
  step_id uuid not null,
  task_id uuid not null,
  from_state text,
  to_state text not null,
  event text not null,
  attempt_id uuid,
  metadata jsonb,
  sort_key integer not null,
  created_at timestamptz not null default now(),
  constraint step_transitions_pkey primary key (step_id, sort_key, created_at)
) partition by range (created_at);

create table task_transitions (
  task_id uuid not null,
  from_state text,
  to_state text not null,
  event text not null,
  attempt_id uuid,
  metadata jsonb,
  sort_key integer not null,
  created_at timestamptz not null default now(),
  constraint task_transitions_pkey primary key (task_id, sort_key, created_at)
) partition by range (created_at);

create table step_attempts (
  attempt_id uuid not null,
  step_id uuid not null,
  task_id uuid not null,
  attempt integer not null,
  -- the broker that held the lease when the attempt ended
  broker_id text not null,
  pool_id text,
  started_at timestamptz not null,
  finished_at timestamptz not null default now(),
  duration_ms double precision,
  -- complete | error: a handler's result; timeout: the lease expired;
  -- lost: the pool or broker went away (counted); undelivered: never reached a handler (not counted);
  -- cancelled: the task was cancelled
  outcome text not null,
  error jsonb,
  output_bytes integer,
  cost double precision,
  tokens bigint,
  artifacts jsonb,
  constraint step_attempts_pkey primary key (attempt_id, finished_at),
  constraint step_attempts_outcome_check
    check (outcome in ('complete', 'error', 'timeout', 'lost', 'undelivered', 'cancelled'))
) partition by range (finished_at);
create index step_attempts_step on step_attempts (step_id, started_at);

do $$
declare
  v_until timestamptz := date_trunc('day', now() at time zone 'UTC') at time zone 'UTC' + interval '1 day';
  v_table text;
begin
  foreach v_table in array array['step_transitions', 'task_transitions', 'step_attempts'] loop
    execute format('alter table %I attach partition %I for values from (minvalue) to (%L)',
                   v_table, v_table || '_legacy', v_until);
    execute format('create table %I partition of %I default', v_table || '_default', v_table);
  end loop;
end
$$;
-- The legacy tables were written for updates (fillfactor 60); from here on they only take inserts.
alter table step_attempts_legacy reset (fillfactor);

create trigger step_transitions_insert_only before update on step_transitions
  for each row execute function reject_history_rewrite();
create trigger task_transitions_insert_only before update on task_transitions
  for each row execute function reject_history_rewrite();
create trigger step_attempts_insert_only before update on step_attempts
  for each row execute function reject_history_rewrite();

-- 4. Room for the updates that remain. A task row is updated twice (started, ended) and touches no
--    indexed column, but at fillfactor 70 only some of a page's rows found room for a HOT version:
--    measured on 10,000 one-step tasks (claim + completion by 512, WAL read with pg_walinspect),
--    fillfactor 50 turns 8,220 of 20,000 task updates that were not HOT into 779, and WAL per task
--    falls by about 5%. A step's update cannot be HOT (state is in the predicates of its partial
--    indexes), but with free space on its page the new version stays there: no lock record to
--    release the page first, no second page dirtied. Applies to pages written from now on.
alter table tasks set (fillfactor = 50);
alter table steps set (fillfactor = 70);
