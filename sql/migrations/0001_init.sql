-- 0001_init: the state store of stepbroker: templates, tasks, steps, edges, attempts, transitions.
-- Runs once, in a transaction under an advisory lock, with search_path set to the target schema. Never edit it once released: add 0002_... instead.

-- A registered workflow definition. `definition` is the normalized template
-- (every default filled in), so step rows can be built from it in SQL.
create table task_templates (
  id integer generated always as identity primary key,
  namespace text not null,
  name text not null,
  version text not null,
  definition jsonb not null,
  created_at timestamptz not null default now(),
  constraint task_templates_triple unique (namespace, name, version)
);
-- "version omitted = latest registered": latest means registered last.
create index task_templates_latest on task_templates (namespace, name, id desc);

create table tasks (
  id uuid primary key,
  template_id integer not null references task_templates (id),
  state text not null default 'pending',
  context jsonb not null,
  priority integer not null default 0,
  idempotency_key text unique,
  error jsonb,
  created_at timestamptz not null default now(),
  finished_at timestamptz,
  constraint tasks_state_check
    check (state in ('pending', 'in_progress', 'complete', 'error', 'cancelled')),
  constraint tasks_context_is_object check (jsonb_typeof(context) = 'object'),
  constraint tasks_finished_at_iff_final
    check ((state in ('complete', 'error', 'cancelled')) = (finished_at is not null))
);

create table steps (
  id uuid primary key,
  task_id uuid not null references tasks (id) on delete cascade,
  -- index of the step in its template; orders steps and dependencies in views
  position integer not null,
  name text not null,
  handler text not null,
  config jsonb not null,
  state text not null,
  -- `output` holds any JSON value (JSON null is the jsonb 'null', not SQL NULL);
  -- has_output says a value was stored, so "complete" can never lack one.
  output jsonb,
  has_output boolean not null default false,
  -- the last error: kept while a retry waits, and when the step failed for good
  error jsonb,
  attempts integer not null default 0,
  max_attempts integer not null,
  retryable boolean not null,
  backoff_initial_ms integer not null,
  backoff_multiplier double precision not null,
  backoff_max_ms integer not null,
  backoff_jitter double precision not null,
  timeout_ms integer not null,
  -- parents not yet complete or resolved_manually; kept incrementally, 0 means runnable
  pending_parents integer not null,
  -- earliest dispatch time; set to now() whenever the step becomes ready (or later, for a backoff)
  run_at timestamptz not null default now(),
  priority integer not null default 0,
  lease_attempt_id uuid,
  lease_broker_id text,
  lease_expires_at timestamptz,
  created_at timestamptz not null default now(),
  finished_at timestamptz,
  constraint steps_task_name unique (task_id, name),
  constraint steps_state_check
    check (state in ('pending', 'ready', 'in_progress', 'complete', 'error', 'cancelled', 'resolved_manually')),
  -- The history this answers: a step reached "complete" with its result dropped.
  constraint steps_complete_has_output check (state <> 'complete' or has_output),
  constraint steps_has_output_matches check (has_output = (output is not null)),
  constraint steps_lease_iff_in_progress check (
    (state = 'in_progress') = (lease_attempt_id is not null)
    and (lease_attempt_id is null) = (lease_expires_at is null)
  ),
  constraint steps_ready_has_no_pending_parents check (state <> 'ready' or pending_parents = 0),
  constraint steps_counts check (pending_parents >= 0 and attempts >= 0 and max_attempts >= 1 and timeout_ms >= 1),
  constraint steps_backoff check (
    backoff_initial_ms >= 0 and backoff_multiplier >= 1 and backoff_max_ms >= 0
    and backoff_jitter >= 0 and backoff_jitter <= 1
  )
);
-- Dispatch reads only this: its size is the ready work, not the history.
create index steps_ready on steps (priority desc, run_at) where state = 'ready';
-- The lease reaper reads only in-flight steps.
create index steps_in_flight on steps (lease_expires_at) where state = 'in_progress';

create table step_edges (
  parent_id uuid not null references steps (id) on delete cascade,
  child_id uuid not null references steps (id) on delete cascade,
  primary key (parent_id, child_id),
  constraint step_edges_no_self check (parent_id <> child_id)
);
create index step_edges_child on step_edges (child_id);

-- One row per attempt, written when the step is claimed and finished exactly once.
-- Nothing is ever read-modify-written as a whole array.
create table step_attempts (
  attempt_id uuid primary key,
  step_id uuid not null references steps (id) on delete cascade,
  task_id uuid not null,
  attempt integer not null,
  broker_id text not null,
  pool_id text,
  started_at timestamptz not null default now(),
  finished_at timestamptz,
  duration_ms double precision,
  -- complete | error: a handler's result; timeout: the lease expired;
  -- lost: the pool or broker went away (counted); undelivered: never reached a handler (not counted);
  -- cancelled: the task was cancelled
  outcome text,
  error jsonb,
  output_bytes integer,
  cost double precision,
  tokens bigint,
  artifacts jsonb,
  constraint step_attempts_outcome_check
    check (outcome in ('complete', 'error', 'timeout', 'lost', 'undelivered', 'cancelled')),
  constraint step_attempts_finished_iff_outcome check ((finished_at is null) = (outcome is null))
);
create index step_attempts_step on step_attempts (step_id, started_at);
create index step_attempts_task on step_attempts (task_id, started_at);

create table step_transitions (
  id bigint generated always as identity primary key,
  step_id uuid not null references steps (id) on delete cascade,
  task_id uuid not null,
  from_state text,
  to_state text not null,
  event text not null,
  attempt_id uuid,
  metadata jsonb,
  sort_key integer not null,
  most_recent boolean not null,
  created_at timestamptz not null default now(),
  constraint step_transitions_order unique (step_id, sort_key)
);
-- Exactly one current row per step.
create unique index step_transitions_most_recent on step_transitions (step_id) where most_recent;
create index step_transitions_task on step_transitions (task_id);

create table task_transitions (
  id bigint generated always as identity primary key,
  task_id uuid not null references tasks (id) on delete cascade,
  from_state text,
  to_state text not null,
  event text not null,
  attempt_id uuid,
  metadata jsonb,
  sort_key integer not null,
  most_recent boolean not null,
  created_at timestamptz not null default now(),
  constraint task_transitions_order unique (task_id, sort_key)
);
create unique index task_transitions_most_recent on task_transitions (task_id) where most_recent;

-- Retry delay after the attempt-th failure: initial * multiplier^(attempt-1), capped,
-- minus up to `jitter` of itself at random (so retries of many steps spread out).
create function backoff_delay_ms(
  initial_ms integer, multiplier double precision, max_ms integer, jitter double precision, attempt integer
) returns double precision
language sql volatile
as $$
  select least(max_ms::double precision,
               initial_ms * power(multiplier, least(greatest(attempt - 1, 0), 60)))
         * (1 - jitter * random())
$$;

-- The legal moves, the same as broker/state/transitions.ts. The triggers fire
-- only on an illegal move (the WHEN clause does the test), so legal updates pay nothing.
create function reject_illegal_move() returns trigger
language plpgsql
as $$
begin
  raise exception 'illegal % state move % -> % (id %)', tg_argv[0], old.state, new.state, old.id
    using errcode = 'check_violation';
end
$$;

create trigger steps_legal_moves
  before update of state on steps
  for each row
  when (old.state is distinct from new.state and (old.state || '>' || new.state) not in (
    'pending>ready', 'pending>cancelled', 'pending>resolved_manually',
    'ready>in_progress', 'ready>cancelled',
    'in_progress>complete', 'in_progress>ready', 'in_progress>error', 'in_progress>cancelled',
    'error>ready', 'error>resolved_manually',
    'cancelled>ready', 'cancelled>pending'))
  execute function reject_illegal_move('step');

create trigger tasks_legal_moves
  before update of state on tasks
  for each row
  when (old.state is distinct from new.state and (old.state || '>' || new.state) not in (
    'pending>in_progress', 'pending>cancelled', 'pending>complete', 'pending>error',
    'in_progress>complete', 'in_progress>error', 'in_progress>cancelled',
    'error>in_progress', 'cancelled>in_progress'))
  execute function reject_illegal_move('task');

-- History is append-only: a finished attempt never changes; a transition only
-- ever loses its most_recent flag.
create function reject_history_rewrite() returns trigger
language plpgsql
as $$
begin
  raise exception '% rows are append-only', tg_table_name using errcode = 'check_violation';
end
$$;

create trigger step_attempts_finished_are_final
  before update on step_attempts
  for each row when (old.finished_at is not null)
  execute function reject_history_rewrite();

create trigger step_transitions_append_only
  before update on step_transitions
  for each row when (not (old.most_recent and not new.most_recent)
    or row(old.step_id, old.from_state, old.to_state, old.event, old.attempt_id, old.sort_key, old.metadata)
       is distinct from row(new.step_id, new.from_state, new.to_state, new.event, new.attempt_id, new.sort_key, new.metadata))
  execute function reject_history_rewrite();

create trigger task_transitions_append_only
  before update on task_transitions
  for each row when (not (old.most_recent and not new.most_recent)
    or row(old.task_id, old.from_state, old.to_state, old.event, old.attempt_id, old.sort_key, old.metadata)
       is distinct from row(new.task_id, new.from_state, new.to_state, new.event, new.attempt_id, new.sort_key, new.metadata))
  execute function reject_history_rewrite();
