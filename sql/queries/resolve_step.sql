-- An operator marks an error step (or a pending one blocked by a failure) resolved_manually, optionally with an output; it counts as a finished parent, so children whose last parent it was become ready, and an errored task runs again. Call with the task locked.
-- $1 uuid step id, $2 text output as JSON text (null: none), $3 text channel, $4 text payload. Returns kind 'resolved' (the step) and kind 'readied' rows; no row when the step is not error or pending.
with target as (
  select s.id, s.state from steps s where s.id = $1::uuid and s.state in ('error', 'pending')
),
resolved as (
  update steps s
  set state = 'resolved_manually', output = $2::jsonb, has_output = $2::text is not null, finished_at = now(),
      history_seq = s.history_seq + 1
  from target tg
  where s.id = tg.id
  returning s.id, s.task_id, s.handler, s.state, s.run_at, s.history_seq, tg.state as from_state
),
finished_parents as (
  select e.child_id, count(*)::int as n
  from resolved r join step_edges e on e.parent_id = r.id
  group by e.child_id
),
readied as (
  update steps c
  set pending_parents = c.pending_parents - fp.n,
      state = case when c.state = 'pending' and c.pending_parents = fp.n then 'ready' else c.state end,
      run_at = case when c.state = 'pending' and c.pending_parents = fp.n then now() else c.run_at end,
      history_seq = c.history_seq + case when c.state = 'pending' and c.pending_parents = fp.n then 1 else 0 end
  from finished_parents fp
  where c.id = fp.child_id
  returning c.id, c.task_id, c.handler, c.state, c.run_at, c.history_seq
),
step_history as (
  insert into step_transitions (step_id, task_id, from_state, to_state, event, sort_key)
  select r.id, r.task_id, r.from_state, r.state, 'resolved', r.history_seq from resolved r
  union all
  select rd.id, rd.task_id, 'pending', 'ready', 'parents_finished', rd.history_seq from readied rd where rd.state = 'ready'
),
resumed as (
  update tasks t
  set state = 'in_progress', finished_at = null, error = null, history_seq = t.history_seq + 1
  from (select id, state from tasks where id = (select r.task_id from resolved r)) old
  where t.id = old.id and old.state = 'error'
  returning t.id, t.history_seq, old.state as from_state
),
task_history as (
  insert into task_transitions (task_id, from_state, to_state, event, sort_key)
  select rs.id, rs.from_state, 'in_progress', 'resumed', rs.history_seq
  from resumed rs
),
notified as (
  select pg_notify($3::text, $4::text) from readied rd where rd.state = 'ready' limit 1
)
select 'resolved' as kind, r.id as step_id, r.task_id, r.handler, r.state, r.run_at,
       (select count(*) from notified)::int as notified
from resolved r
union all
select 'readied', rd.id, rd.task_id, rd.handler, rd.state, rd.run_at, 0
from readied rd
where rd.state = 'ready'
