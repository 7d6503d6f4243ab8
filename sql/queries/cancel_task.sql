-- Cancels a task: every unfinished step (pending, ready, in_progress) becomes cancelled, their in-flight attempts end, the task becomes cancelled. Call with the task locked.
-- $1 uuid task id. Returns the attempts that were in flight and the broker that leased each (so their pools can be told, by whichever broker holds them).
with unfinished as (
  select s.id, s.state, s.lease_attempt_id, s.lease_broker_id
  from steps s
  where s.task_id = $1::uuid and s.state in ('pending', 'ready', 'in_progress')
  for update
),
cancelled as (
  update steps s
  set state = 'cancelled', finished_at = now(),
      lease_attempt_id = null, lease_broker_id = null, lease_expires_at = null
  from unfinished u
  where s.id = u.id
  returning s.id, s.task_id, u.state as from_state, u.lease_attempt_id, u.lease_broker_id
),
attempts_ended as (
  update step_attempts a
  set finished_at = now(), outcome = 'cancelled', duration_ms = extract(epoch from now() - a.started_at) * 1000
  from cancelled c
  where a.attempt_id = c.lease_attempt_id and a.finished_at is null
),
step_flipped as (
  update step_transitions t set most_recent = false
  from cancelled c
  where t.step_id = c.id and t.most_recent
  returning t.step_id, t.task_id, t.sort_key, c.from_state, c.lease_attempt_id
),
step_history as (
  insert into step_transitions (step_id, task_id, from_state, to_state, event, attempt_id, sort_key, most_recent)
  select f.step_id, f.task_id, f.from_state, 'cancelled', 'cancelled', f.lease_attempt_id, f.sort_key + 1, true
  from step_flipped f
),
task_ended as (
  update tasks t
  set state = 'cancelled', finished_at = now()
  from (select id, state from tasks where id = $1::uuid) old
  where t.id = old.id and old.state in ('pending', 'in_progress')
  returning t.id, old.state as from_state
),
task_flipped as (
  update task_transitions t set most_recent = false
  where t.task_id = $1::uuid and exists (select 1 from task_ended) and t.most_recent
  returning t.task_id, t.sort_key
),
task_history as (
  insert into task_transitions (task_id, from_state, to_state, event, sort_key, most_recent)
  select te.id, te.from_state, 'cancelled', 'cancelled', f.sort_key + 1, true
  from task_ended te join task_flipped f on f.task_id = te.id
)
select c.lease_attempt_id as attempt_id, c.lease_broker_id as broker_id from cancelled c where c.lease_attempt_id is not null
