-- An operator's retry: the task's error and cancelled steps (or one error step) start over with attempts reset, ready when their parents are done, else pending; the task runs again. Call with the task locked.
-- $1 uuid task id, $2 uuid only this step (null: all error and cancelled steps), $3 text channel, $4 text payload. Returns the steps retried.
with targets as (
  select s.id, s.state
  from steps s
  where s.task_id = $1::uuid
    and case when $2::uuid is null then s.state in ('error', 'cancelled') else s.id = $2::uuid and s.state = 'error' end
),
retried as (
  update steps s
  set state = case when s.pending_parents = 0 then 'ready' else 'pending' end,
      attempts = 0, error = null, run_at = now(), finished_at = null, history_seq = s.history_seq + 1
  from targets tg
  where s.id = tg.id
  returning s.id, s.task_id, s.handler, s.state, s.run_at, s.history_seq, tg.state as from_state
),
step_history as (
  insert into step_transitions (step_id, task_id, from_state, to_state, event, sort_key)
  select r.id, r.task_id, r.from_state, r.state, 'retried', r.history_seq
  from retried r
),
resumed as (
  update tasks t
  set state = 'in_progress', finished_at = null, error = null, history_seq = t.history_seq + 1
  from (select id, state from tasks where id = $1::uuid) old
  where t.id = old.id and old.state in ('error', 'cancelled') and exists (select 1 from retried)
  returning t.id, t.history_seq, old.state as from_state
),
task_history as (
  insert into task_transitions (task_id, from_state, to_state, event, sort_key)
  select rs.id, rs.from_state, 'in_progress', 'retried', rs.history_seq
  from resumed rs
),
notified as (
  select pg_notify($3::text, $4::text) from retried r where r.state = 'ready' limit 1
)
select r.id as step_id, r.task_id, r.handler, r.state, r.run_at, (select count(*) from notified)::int as notified
from retried r
