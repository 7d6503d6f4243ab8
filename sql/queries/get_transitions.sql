-- Reads the transition history of one task and of each of its steps, oldest first, for the dashboard and `stepbroker history`.
-- $1 uuid task id. Returns one row per transition, a running task's start and attempt's claim among them; step_id and step_name are null on the task's own rows.
select x.step_id, x.step_name, x.from_state, x.to_state, x.event, x.attempt_id, x.metadata, x.created_at
from (
  select null::uuid as step_id, null::text as step_name, null::int as position, tr.from_state, tr.to_state,
         tr.event, tr.attempt_id, tr.metadata, tr.created_at, tr.sort_key
  from task_transitions tr
  where tr.task_id = $1::uuid
  union all
  -- by step id: step_transitions has no index by task (see migration 0002)
  select s.id, s.name, s.position, tr.from_state, tr.to_state, tr.event, tr.attempt_id, tr.metadata, tr.created_at, tr.sort_key
  from steps s
  join step_transitions tr on tr.step_id = s.id
  where s.task_id = $1::uuid
  union all
  -- a running task's start, from the row: its transition is written with its next one (0016)
  select null::uuid, null::text, null::int, 'pending', 'in_progress', 'started', null::uuid, null::jsonb,
         t.started_at, 2
  from tasks t
  where t.id = $1::uuid and t.history_seq = 2 and t.started_at is not null
  union all
  -- a running attempt's claim, from its lease: its transition is written when the attempt ends
  -- (migration 0016), unless its claim wrote it (leased before 0016)
  select s.id, s.name, s.position, 'ready', 'in_progress', 'claimed', s.lease_attempt_id,
         jsonb_build_object('broker_id', s.lease_broker_id, 'attempt', s.attempts), s.lease_started_at, s.history_seq
  from steps s
  where s.task_id = $1::uuid and s.lease_attempt_id is not null
    and not exists (select 1 from leases_claimed_before_0016 l where l.attempt_id = s.lease_attempt_id)
) x
-- rows written in one transaction share created_at: the task's own first, then by step, each step's in order
order by x.created_at, x.position nulls first, x.sort_key
