-- Claims up to $3 ready steps (highest priority, then longest ready) whose handler is served, starting one attempt each under a lease; a task claimed for the first time moves pending -> in_progress.
-- $1 text broker id, $2 text[] handlers served, $3 int most steps, $4 uuid[] only these steps (null: any), $5 text the pool the attempts go to (null: not yet known). Returns one row per attempt with all a STEP message needs.
--
-- Plan shape (this is the hot path): big tables are only ever reached by primary-key or partial-index
-- probes for the rows at hand: `= any(array(...))`, or as the inner side of UPDATE ... FROM a small CTE.
-- No two CTEs are joined to each other (a nested loop over CTE scans would be quadratic).
with picked as (
  -- any ready step: walk the ready index in priority order (see pick_ready_steps in 0004)
  select p.id from pick_ready_steps($2::text[], $3::int) as p(id)
  where $4::uuid[] is null
  union all
  -- only the given steps (children just readied): a few primary-key probes
  select given.id from (
    select s.id
    from steps s
    where $4::uuid[] is not null
      and s.id = any($4::uuid[])
      and s.state = 'ready'
      and s.run_at <= now()
      and s.handler = any($2::text[])
    order by s.priority desc, s.run_at
    limit $3
    for update skip locked
  ) as given
),
claimed as (
  update steps s
  set state = 'in_progress',
      attempts = s.attempts + 1,
      lease_attempt_id = new_id(),
      lease_broker_id = $1,
      lease_expires_at = now() + s.timeout_ms * interval '1 millisecond'
  where s.id = any(array(select p.id from picked p))
  returning s.id, s.task_id, s.name, s.handler, s.config, s.attempts, s.max_attempts, s.timeout_ms,
            s.lease_attempt_id, s.lease_expires_at, s.priority, s.run_at, s.position
),
attempt_rows as (
  insert into step_attempts (attempt_id, step_id, task_id, attempt, broker_id, pool_id)
  select c.lease_attempt_id, c.id, c.task_id, c.attempts, $1, $5::text from claimed c
),
step_flipped as (
  update step_transitions t set most_recent = false
  from claimed c
  where t.step_id = c.id and t.most_recent
  returning t.step_id, t.task_id, t.sort_key, c.lease_attempt_id, c.attempts
),
step_history as (
  insert into step_transitions (step_id, task_id, from_state, to_state, event, attempt_id, metadata, sort_key, most_recent)
  select f.step_id, f.task_id, 'ready', 'in_progress', 'claimed', f.lease_attempt_id,
         jsonb_build_object('broker_id', $1::text, 'attempt', f.attempts), f.sort_key + 1, true
  from step_flipped f
),
-- SKIP LOCKED here too: a claim never waits, so claims cannot deadlock on task rows.
-- Whoever holds a pending task's lock is another claim starting it, or a cancel.
started as (
  update tasks t set state = 'in_progress'
  where t.id = any(array(
    select t2.id from tasks t2
    where t2.id = any(array(select c.task_id from claimed c)) and t2.state = 'pending'
    order by t2.id
    for update skip locked
  ))
  returning t.id
),
task_flipped as (
  update task_transitions t set most_recent = false
  from started s
  where t.task_id = s.id and t.most_recent
  returning t.task_id, t.sort_key
),
task_history as (
  insert into task_transitions (task_id, from_state, to_state, event, sort_key, most_recent)
  select f.task_id, 'pending', 'in_progress', 'started', f.sort_key + 1, true
  from task_flipped f
)
-- One probe of the task row per claimed step gives both its template and its context (a correlated
-- subquery each probed it twice); the template table is a handful of rows.
select c.task_id, c.id as step_id, c.lease_attempt_id as attempt_id, c.name as step_name, c.handler,
       c.attempts as attempt, c.max_attempts, c.timeout_ms,
       jsonb_build_object('namespace', tt.namespace, 'name', tt.name, 'version', tt.version) as template,
       t.context,
       c.config,
       -- read with a snapshot taken after the pick (see step_inputs in 0004)
       step_inputs(c.id) as inputs,
       c.lease_expires_at
from claimed c
join tasks t on t.id = c.task_id
join task_templates tt on tt.id = t.template_id
-- in dispatch order (a join does not keep the order the steps were picked in)
order by c.priority desc, c.run_at, c.task_id, c.position
