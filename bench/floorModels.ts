/**
 * The data models the write floor (./floor.ts) measures, each self-contained:
 * its own minimal tables (the columns and indexes the broker's tables have that
 * a one-step task's writes touch), created in a schema of its own and dropped
 * after, so the floor of a model stays measurable whatever the migrations in
 * sql/ make of the real tables. What a model is not: a state manager. No task
 * locks, no STEP fields, no retry policy, no triggers; only the rows a one-step
 * task must write, in two bare statements (the claim and the result).
 *
 * - floor_before: the pre-0013 model. The attempt row is inserted at the claim
 *   and finished by an update; every transition flips the previous one's
 *   most_recent flag (a non-HOT update plus a partial unique index entry);
 *   nothing is partitioned.
 * - floor_new: the model 0013 migrates to. Transitions are insert-only, keyed
 *   by the row's history_seq counter; the running attempt lives on the step's
 *   lease columns and its one row is inserted when it ends; transitions and
 *   attempts are partitioned by day.
 * - floor_new_attempt_at_claim: floor_new, but the attempt row is inserted at
 *   the claim and finished by an update that can be HOT (fillfactor 60, no
 *   indexed column changes), probing by its key (attempt_id, started_at).
 * - floor_new_ready_queue: floor_new, plus a small step_queue table that
 *   dispatch and the lease reaper read instead of partial indexes on
 *   steps.state, so a step's own updates change no indexed column and can be
 *   HOT (fillfactor 70 on steps).
 * - floor_new_deferred_start: floor_new, but the claim writes only the step's
 *   lease: its `claimed` transition and the task's start (update and
 *   `started` transition) are written by the result's statement, stamped with
 *   the claim's time, as the issue allows (Temporal writes ActivityTaskStarted
 *   with the activity's end). The claim bumps the step's counter, so the
 *   missing row's sort_key is known; the task goes pending -> complete in one
 *   update. One row write fewer per task, and a claim of one statement.
 *
 * Why the HOT shares these report stay well below 100% even where no indexed
 * column changes: a claim updates a batch of steps created together, so most
 * rows of a page are updated in one transaction, and the old versions cannot
 * be pruned before it commits; the page's free space (30% at fillfactor 70,
 * 40% at 60) holds new versions for only part of them. Measured on 20,000
 * tasks in batches of 2048: at fillfactor 70/60, steps 39% HOT (ready queue)
 * and attempts 56-60%; at 40, steps 73% and attempts 100%.
 *
 * The claim takes the batch size ($1); the result of the new models takes the
 * claimed step ids and attempt ids (the broker has both in memory when a
 * result arrives), the pre-0013 one only the attempt ids, as it did.
 */

export type FloorModelName =
  | "floor_before"
  | "floor_new"
  | "floor_new_attempt_at_claim"
  | "floor_new_ready_queue"
  | "floor_new_deferred_start";

export interface FloorModel {
  name: FloorModelName;
  /** One line for the table: what the model is. */
  summary: string;
  /** Creates the tables (run with search_path set to the model's own schema). */
  ddl: string;
  /** Creates $1 ready one-step tasks, with their creation transitions. */
  fill: string;
  /** Claims up to $1 ready steps; returns one row with `step_ids` and `attempt_ids` (null when none). */
  claim: string;
  /** Stores a complete result for each claimed attempt; returns `stored`. */
  complete: string;
  /** The complete statement's parameters: (step ids $1, attempt ids $2), or (attempt ids $1) alone. */
  completeTakes: "steps and attempts" | "attempts";
}

/** Daily partitions from yesterday to tomorrow (UTC), so a run across midnight stays in named ones, plus a default. */
function dailyPartitions(table: string, options = ""): string {
  const day = (offset: number): string => {
    const d = new Date();
    d.setUTCHours(0, 0, 0, 0);
    d.setUTCDate(d.getUTCDate() + offset);
    return d.toISOString();
  };
  const lines: string[] = [];
  for (let offset = -1; offset <= 1; offset++) {
    const suffix = day(offset).slice(0, 10).replaceAll("-", "");
    lines.push(
      `create table ${table}_p${suffix} partition of ${table} ` +
        `for values from ('${day(offset)}') to ('${day(offset + 1)}') ${options};`,
    );
  }
  lines.push(`create table ${table}_default partition of ${table} default ${options};`);
  return lines.join("\n");
}

// ------------------------------------------------------------------ before

const BEFORE_DDL = `
create table tasks (
  id uuid primary key,
  state text not null default 'pending',
  context jsonb not null,
  priority integer not null default 0,
  created_at timestamptz not null default now(),
  finished_at timestamptz
) with (fillfactor = 70);
create table steps (
  id uuid primary key,
  task_id uuid not null,
  name text not null,
  handler text not null,
  config jsonb not null,
  state text not null,
  output jsonb,
  has_output boolean not null default false,
  error jsonb,
  attempts integer not null default 0,
  max_attempts integer not null,
  timeout_ms integer not null,
  run_at timestamptz not null default now(),
  priority integer not null default 0,
  lease_attempt_id uuid,
  lease_broker_id text,
  lease_expires_at timestamptz,
  created_at timestamptz not null default now(),
  finished_at timestamptz,
  constraint steps_task_name unique (task_id, name)
);
create index steps_ready on steps (priority desc, run_at) where state = 'ready';
create index steps_in_flight on steps (lease_expires_at) where state = 'in_progress';
create table step_attempts (
  attempt_id uuid primary key,
  step_id uuid not null,
  task_id uuid not null,
  attempt integer not null,
  broker_id text not null,
  pool_id text,
  started_at timestamptz not null default now(),
  finished_at timestamptz,
  duration_ms double precision,
  outcome text
) with (fillfactor = 60);
create index step_attempts_step on step_attempts (step_id, started_at);
create table step_transitions (
  id bigint generated always as identity,
  step_id uuid not null,
  task_id uuid not null,
  from_state text,
  to_state text not null,
  event text not null,
  attempt_id uuid,
  sort_key integer not null,
  most_recent boolean not null,
  created_at timestamptz not null default now(),
  primary key (step_id, sort_key)
);
create unique index step_transitions_most_recent on step_transitions (step_id) where most_recent;
create table task_transitions (
  id bigint generated always as identity,
  task_id uuid not null,
  from_state text,
  to_state text not null,
  event text not null,
  attempt_id uuid,
  sort_key integer not null,
  most_recent boolean not null,
  created_at timestamptz not null default now(),
  primary key (task_id, sort_key)
);
create unique index task_transitions_most_recent on task_transitions (task_id) where most_recent;`;

const BEFORE_FILL = `
with g as (select i, new_id() as task_id, new_id() as step_id from generate_series(1, $1::int) as i),
new_tasks as (
  insert into tasks (id, context) select task_id, jsonb_build_object('n', i) from g
),
new_steps as (
  insert into steps (id, task_id, name, handler, config, state, max_attempts, timeout_ms)
  select step_id, task_id, 's', 'noop', '{}'::jsonb, 'ready', 3, 30000 from g
),
step_history as (
  insert into step_transitions (step_id, task_id, from_state, to_state, event, sort_key, most_recent)
  select step_id, task_id, null, 'ready', 'created', 1, true from g
)
insert into task_transitions (task_id, from_state, to_state, event, sort_key, most_recent)
select task_id, null, 'pending', 'created', 1, true from g`;

// The writes of a claim, as claim_steps() made them before 0013 for a ready step of a pending task.
const BEFORE_CLAIM = `
with picked as (
  select id from steps
  where state = 'ready' and run_at <= now()
  order by priority desc, run_at
  limit $1
  for update skip locked
),
claimed as (
  update steps s
  set state = 'in_progress', attempts = s.attempts + 1, lease_attempt_id = new_id(), lease_broker_id = 'bench',
      lease_expires_at = now() + s.timeout_ms * interval '1 millisecond'
  from picked p where s.id = p.id
  returning s.id, s.task_id, s.lease_attempt_id, s.attempts
),
attempt_rows as (
  insert into step_attempts (attempt_id, step_id, task_id, attempt, broker_id, pool_id)
  select c.lease_attempt_id, c.id, c.task_id, c.attempts, 'bench', 'bench' from claimed c
),
step_flips as (
  update step_transitions t set most_recent = false
  from claimed c where t.step_id = c.id and t.most_recent
  returning t.step_id, t.task_id, t.sort_key, c.lease_attempt_id
),
step_history as (
  insert into step_transitions (step_id, task_id, from_state, to_state, event, attempt_id, sort_key, most_recent)
  select f.step_id, f.task_id, 'ready', 'in_progress', 'claimed', f.lease_attempt_id, f.sort_key + 1, true
  from step_flips f
),
started as (
  update tasks t set state = 'in_progress'
  from (select distinct task_id from claimed) c
  where t.id = c.task_id and t.state = 'pending'
  returning t.id
),
task_flips as (
  update task_transitions t set most_recent = false
  from started s where t.task_id = s.id and t.most_recent
  returning t.task_id, t.sort_key
),
task_history as (
  insert into task_transitions (task_id, from_state, to_state, event, sort_key, most_recent)
  select f.task_id, 'pending', 'in_progress', 'started', f.sort_key + 1, true from task_flips f
)
select array_agg(c.id) as step_ids, array_agg(c.lease_attempt_id) as attempt_ids from claimed c`;

// The writes of a stored result that ends a one-step task, before 0013: the step is found
// through its attempt row, so the statement takes only the attempt ids ($1).
const BEFORE_COMPLETE = `
with stored as (
  update steps s
  set state = 'complete', output = '{}'::jsonb, has_output = true, finished_at = now(),
      lease_attempt_id = null, lease_broker_id = null, lease_expires_at = null
  from step_attempts a
  where a.attempt_id = any($1::uuid[]) and s.id = a.step_id and s.lease_attempt_id = a.attempt_id
  returning s.id, s.task_id, a.attempt_id
),
attempt_rows as (
  update step_attempts a set finished_at = now(), outcome = 'complete', duration_ms = 0
  from stored st where a.attempt_id = st.attempt_id
),
step_flips as (
  update step_transitions t set most_recent = false
  from stored st where t.step_id = st.id and t.most_recent
  returning t.step_id, t.task_id, t.sort_key, st.attempt_id
),
step_history as (
  insert into step_transitions (step_id, task_id, from_state, to_state, event, attempt_id, sort_key, most_recent)
  select f.step_id, f.task_id, 'in_progress', 'complete', 'completed', f.attempt_id, f.sort_key + 1, true
  from step_flips f
),
ended as (
  update tasks t set state = 'complete', finished_at = now()
  from stored st where t.id = st.task_id
  returning t.id
),
task_flips as (
  update task_transitions t set most_recent = false
  from ended e where t.task_id = e.id and t.most_recent
  returning t.task_id, t.sort_key
),
task_history as (
  insert into task_transitions (task_id, from_state, to_state, event, sort_key, most_recent)
  select f.task_id, 'in_progress', 'complete', 'completed', f.sort_key + 1, true from task_flips f
)
select count(*)::int as stored from stored`;

// --------------------------------------------------------------------- new

interface NewModelShape {
  /** The attempt row is inserted at the claim (partitioned by started_at) rather than when it ends. */
  attemptAtClaim: boolean;
  /** Dispatch and the reaper read step_queue; steps has no partial index on state. */
  readyQueue: boolean;
  /** The claim's transitions and the task's start are written by the result's statement. */
  deferredStart?: boolean;
}

function newDdl(shape: NewModelShape): string {
  const attemptKey = shape.attemptAtClaim ? "started_at" : "finished_at";
  return `
create table tasks (
  id uuid primary key,
  state text not null default 'pending',
  context jsonb not null,
  priority integer not null default 0,
  history_seq integer not null,
  created_at timestamptz not null default now(),
  finished_at timestamptz
) with (fillfactor = 70);
create table steps (
  id uuid primary key,
  task_id uuid not null,
  name text not null,
  handler text not null,
  config jsonb not null,
  state text not null,
  output jsonb,
  has_output boolean not null default false,
  error jsonb,
  attempts integer not null default 0,
  max_attempts integer not null,
  timeout_ms integer not null,
  run_at timestamptz not null default now(),
  priority integer not null default 0,
  history_seq integer not null,
  lease_attempt_id uuid,
  lease_broker_id text,
  lease_pool_id text,
  lease_started_at timestamptz,
  lease_expires_at timestamptz,
  created_at timestamptz not null default now(),
  finished_at timestamptz,
  constraint steps_task_name unique (task_id, name)
)${shape.readyQueue ? " with (fillfactor = 70)" : ""};
${
  shape.readyQueue
    ? `-- Ready and in-flight steps only: dispatch reads the first index, the lease reaper the second.
create table step_queue (
  step_id uuid primary key,
  priority integer not null,
  run_at timestamptz not null,
  lease_expires_at timestamptz
);
create index step_queue_ready on step_queue (priority desc, run_at) where lease_expires_at is null;
create index step_queue_leased on step_queue (lease_expires_at) where lease_expires_at is not null;`
    : `create index steps_ready on steps (priority desc, run_at) where state = 'ready';
create index steps_in_flight on steps (lease_expires_at) where state = 'in_progress';`
}
create table step_attempts (
  attempt_id uuid not null,
  step_id uuid not null,
  task_id uuid not null,
  attempt integer not null,
  broker_id text not null,
  pool_id text,
  started_at timestamptz not null,
  finished_at timestamptz${shape.attemptAtClaim ? "" : " not null"},
  duration_ms double precision,
  outcome text${shape.attemptAtClaim ? "" : " not null"},
  primary key (attempt_id, ${attemptKey})
) partition by range (${attemptKey});
${dailyPartitions("step_attempts", shape.attemptAtClaim ? "with (fillfactor = 60)" : "")}
create index step_attempts_step on step_attempts (step_id, started_at);
create table step_transitions (
  step_id uuid not null,
  task_id uuid not null,
  from_state text,
  to_state text not null,
  event text not null,
  attempt_id uuid,
  sort_key integer not null,
  created_at timestamptz not null default now(),
  primary key (step_id, sort_key, created_at)
) partition by range (created_at);
${dailyPartitions("step_transitions")}
create table task_transitions (
  task_id uuid not null,
  from_state text,
  to_state text not null,
  event text not null,
  attempt_id uuid,
  sort_key integer not null,
  created_at timestamptz not null default now(),
  primary key (task_id, sort_key, created_at)
) partition by range (created_at);
${dailyPartitions("task_transitions")}`;
}

function newFill(shape: NewModelShape): string {
  return `
with g as (select i, new_id() as task_id, new_id() as step_id from generate_series(1, $1::int) as i),
new_tasks as (
  insert into tasks (id, context, history_seq) select task_id, jsonb_build_object('n', i), 1 from g
),
new_steps as (
  insert into steps (id, task_id, name, handler, config, state, max_attempts, timeout_ms, history_seq)
  select step_id, task_id, 's', 'noop', '{}'::jsonb, 'ready', 3, 30000, 1 from g
),${
    shape.readyQueue
      ? `
queued as (
  insert into step_queue (step_id, priority, run_at) select step_id, 0, now() from g
),`
      : ""
  }
step_history as (
  insert into step_transitions (step_id, task_id, from_state, to_state, event, sort_key)
  select step_id, task_id, null, 'ready', 'created', 1 from g
)
insert into task_transitions (task_id, from_state, to_state, event, sort_key)
select task_id, null, 'pending', 'created', 1 from g`;
}

function newClaim(shape: NewModelShape): string {
  const picked = shape.readyQueue
    ? `picked as (
  select q.step_id as id from step_queue q
  where q.lease_expires_at is null and q.run_at <= now()
  order by q.priority desc, q.run_at
  limit $1
  for update skip locked
)`
    : `picked as (
  select id from steps
  where state = 'ready' and run_at <= now()
  order by priority desc, run_at
  limit $1
  for update skip locked
)`;
  const ctes = [
    picked,
    `claimed as (
  update steps s
  set state = 'in_progress', attempts = s.attempts + 1, history_seq = s.history_seq + 1,
      lease_attempt_id = new_id(), lease_broker_id = 'bench', lease_pool_id = 'bench', lease_started_at = now(),
      lease_expires_at = now() + s.timeout_ms * interval '1 millisecond'
  from picked p where s.id = p.id
  returning s.id, s.task_id, s.lease_attempt_id, s.attempts, s.history_seq, s.lease_expires_at
)`,
  ];
  if (shape.readyQueue)
    ctes.push(`leased as (
  update step_queue q set lease_expires_at = c.lease_expires_at from claimed c where q.step_id = c.id
)`);
  if (shape.attemptAtClaim)
    ctes.push(`attempt_rows as (
  insert into step_attempts (attempt_id, step_id, task_id, attempt, broker_id, pool_id, started_at)
  select c.lease_attempt_id, c.id, c.task_id, c.attempts, 'bench', 'bench', now() from claimed c
)`);
  // deferred: the result's statement writes these, from the lease
  if (!shape.deferredStart)
    ctes.push(
      `step_history as (
  insert into step_transitions (step_id, task_id, from_state, to_state, event, attempt_id, sort_key)
  select c.id, c.task_id, 'ready', 'in_progress', 'claimed', c.lease_attempt_id, c.history_seq from claimed c
)`,
      `started as (
  update tasks t set state = 'in_progress', history_seq = t.history_seq + 1
  from (select distinct task_id from claimed) c
  where t.id = c.task_id and t.state = 'pending'
  returning t.id, t.history_seq
)`,
      `task_history as (
  insert into task_transitions (task_id, from_state, to_state, event, sort_key)
  select s.id, 'pending', 'in_progress', 'started', s.history_seq from started s
)`,
    );
  return `
with ${ctes.join(",\n")}
select array_agg(c.id) as step_ids, array_agg(c.lease_attempt_id) as attempt_ids from claimed c`;
}

function newComplete(shape: NewModelShape): string {
  // The attempt row needs the lease as it was; an UPDATE's RETURNING only sees the new row
  // (RETURNING OLD needs PostgreSQL 18), so the lease is read first, by primary key.
  return `
with held as (
  select s.id, s.lease_attempt_id, s.attempts, s.lease_broker_id, s.lease_pool_id, s.lease_started_at
  from unnest($1::uuid[], $2::uuid[]) as r(step_id, attempt_id)
  join steps s on s.id = r.step_id and s.lease_attempt_id = r.attempt_id
),
stored as (
  update steps s
  set state = 'complete', output = '{}'::jsonb, has_output = true, finished_at = now(),
      history_seq = s.history_seq + 1, lease_attempt_id = null, lease_broker_id = null, lease_pool_id = null,
      lease_started_at = null, lease_expires_at = null
  from held h where s.id = h.id
  returning s.id, s.task_id, s.history_seq, h.lease_attempt_id as attempt_id, h.attempts,
            h.lease_broker_id, h.lease_pool_id, h.lease_started_at
),${
    shape.readyQueue
      ? `
dequeued as (
  delete from step_queue q using stored st where q.step_id = st.id
),`
      : ""
  }${
    shape.attemptAtClaim
      ? `
attempt_rows as (
  update step_attempts a set finished_at = now(), outcome = 'complete', duration_ms = 0
  from stored st where a.attempt_id = st.attempt_id and a.started_at = st.lease_started_at
),`
      : `
attempt_rows as (
  insert into step_attempts (attempt_id, step_id, task_id, attempt, broker_id, pool_id, started_at, finished_at,
                             duration_ms, outcome)
  select st.attempt_id, st.id, st.task_id, st.attempts, st.lease_broker_id, st.lease_pool_id, st.lease_started_at,
         now(), 0, 'complete'
  from stored st
),`
  }
${
  shape.deferredStart
    ? `
step_history as (
  insert into step_transitions (step_id, task_id, from_state, to_state, event, attempt_id, sort_key, created_at)
  select st.id, st.task_id, 'ready', 'in_progress', 'claimed', st.attempt_id, st.history_seq - 1, st.lease_started_at
  from stored st
  union all
  select st.id, st.task_id, 'in_progress', 'complete', 'completed', st.attempt_id, st.history_seq, now() from stored st
),
ended as (
  update tasks t set state = 'complete', finished_at = now(), history_seq = t.history_seq + 2
  from stored st where t.id = st.task_id
  returning t.id, t.history_seq, st.lease_started_at
),
task_history as (
  insert into task_transitions (task_id, from_state, to_state, event, sort_key, created_at)
  select e.id, 'pending', 'in_progress', 'started', e.history_seq - 1, e.lease_started_at from ended e
  union all
  select e.id, 'in_progress', 'complete', 'completed', e.history_seq, now() from ended e
)`
    : `
step_history as (
  insert into step_transitions (step_id, task_id, from_state, to_state, event, attempt_id, sort_key)
  select st.id, st.task_id, 'in_progress', 'complete', 'completed', st.attempt_id, st.history_seq from stored st
),
ended as (
  update tasks t set state = 'complete', finished_at = now(), history_seq = t.history_seq + 1
  from stored st where t.id = st.task_id
  returning t.id, t.history_seq
),
task_history as (
  insert into task_transitions (task_id, from_state, to_state, event, sort_key)
  select e.id, 'in_progress', 'complete', 'completed', e.history_seq from ended e
)`
}
select count(*)::int as stored from stored`;
}

function newModel(name: FloorModelName, summary: string, shape: NewModelShape): FloorModel {
  return {
    name,
    summary,
    ddl: newDdl(shape),
    fill: newFill(shape),
    claim: newClaim(shape),
    complete: newComplete(shape),
    completeTakes: "steps and attempts",
  };
}

/** Every model, floor_before first: the others are reported as ratios to it. */
export const floorModels: readonly FloorModel[] = [
  {
    name: "floor_before",
    summary: "pre-0013: most_recent flip, attempt inserted at claim and updated at finish, unpartitioned",
    ddl: BEFORE_DDL,
    fill: BEFORE_FILL,
    claim: BEFORE_CLAIM,
    complete: BEFORE_COMPLETE,
    completeTakes: "attempts",
  },
  newModel("floor_new", "0013: insert-only transitions, attempt inserted once at its end, daily partitions", {
    attemptAtClaim: false,
    readyQueue: false,
  }),
  newModel(
    "floor_new_attempt_at_claim",
    "0013 with the attempt inserted at claim and finished by a HOT update (fillfactor 60)",
    { attemptAtClaim: true, readyQueue: false },
  ),
  newModel(
    "floor_new_ready_queue",
    "0013 plus a step_queue table for dispatch; steps without partial indexes, fillfactor 70",
    { attemptAtClaim: false, readyQueue: true },
  ),
  newModel(
    "floor_new_deferred_start",
    "0013 with the claimed transition and the task's start written by the result's statement",
    { attemptAtClaim: false, readyQueue: false, deferredStart: true },
  ),
];
