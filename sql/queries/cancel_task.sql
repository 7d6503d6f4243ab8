-- Cancels a task: every unfinished step (pending, ready, in_progress) becomes cancelled, their in-flight attempts end, the task becomes cancelled. Call with the task locked.
-- $1 uuid task id. Returns the attempts that were in flight and the broker that leased each (so their pools can be told, by whichever broker holds them).
with unfinished as (
  select s.id, s.state, s.attempts, s.lease_attempt_id, s.lease_broker_id, s.lease_pool_id, s.lease_started_at
  from steps s
  where s.task_id = $1::uuid and s.state in ('pending', 'ready', 'in_progress')
  for update
),
cancelled as (
  update steps s
  set state = 'cancelled', finished_at = now(), history_seq = s.history_seq + 1,
      lease_attempt_id = null, lease_broker_id = null, lease_pool_id = null, lease_started_at = null,
      lease_expires_at = null
  from unfinished u
  where s.id = u.id
  returning s.id, s.task_id, s.history_seq, u.state as from_state, u.attempts, u.lease_attempt_id, u.lease_broker_id,
            u.lease_pool_id, u.lease_started_at
),
attempts_ended as (
  insert into step_attempts (attempt_id, step_id, task_id, attempt, broker_id, pool_id, started_at, duration_ms, outcome)
  select c.lease_attempt_id, c.id, c.task_id, c.attempts, c.lease_broker_id, c.lease_pool_id, c.lease_started_at,
         extract(epoch from now() - c.lease_started_at) * 1000, 'cancelled'
  from cancelled c
  where c.lease_attempt_id is not null
),
-- A running attempt's `claimed` transition, from its lease, at the sort_key its claim reserved
-- (0016; not for a lease whose claim wrote it, leased before 0016), then each step's cancel.
step_history as (
  insert into step_transitions (step_id, task_id, from_state, to_state, event, attempt_id, metadata, sort_key,
                                created_at)
  select c.id, c.task_id, 'ready', 'in_progress', 'claimed', c.lease_attempt_id,
         jsonb_build_object('broker_id', c.lease_broker_id, 'attempt', c.attempts), c.history_seq - 1,
         c.lease_started_at
  from cancelled c
  where c.lease_attempt_id is not null
    and not exists (select 1 from leases_claimed_before_0016 l where l.attempt_id = c.lease_attempt_id)
  union all
  select c.id, c.task_id, c.from_state, 'cancelled', 'cancelled', c.lease_attempt_id, null::jsonb, c.history_seq,
         now()
  from cancelled c
),
task_ended as (
  update tasks t
  set state = 'cancelled', finished_at = now(), history_seq = t.history_seq + 1
  from (select id, state from tasks where id = $1::uuid) old
  where t.id = old.id and old.state in ('pending', 'in_progress')
  returning t.id, t.history_seq, t.started_at, old.state as from_state
),
-- its `started` first, if its claim left it to be written here (0016: see finalize_tasks.sql)
task_history as (
  insert into task_transitions (task_id, from_state, to_state, event, sort_key, created_at)
  select te.id, 'pending', 'in_progress', 'started', 2, te.started_at
  from task_ended te
  where te.history_seq = 3 and te.started_at is not null
  union all
  select te.id, te.from_state, 'cancelled', 'cancelled', te.history_seq, now()
  from task_ended te
)
select c.lease_attempt_id as attempt_id, c.lease_broker_id as broker_id from cancelled c where c.lease_attempt_id is not null
