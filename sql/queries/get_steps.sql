-- Reads every step of the given tasks, in template order, with its parents (name and state, in template order) and the database clock, for views and explain.
-- $1 uuid[] task ids (one for a view or explain; a statement's worth for the replies to a batch of SUBMITs). Returns one row per step, by task, in template order within each.
select s.task_id, s.id, s.position, s.name, s.handler, s.state, s.attempts, s.max_attempts, s.retryable, s.has_output,
       s.output, s.error, s.run_at, s.pending_parents, s.timeout_ms, s.lease_attempt_id, s.lease_broker_id,
       s.lease_expires_at,
       coalesce((select jsonb_agg(jsonb_build_object('name', p.name, 'state', p.state) order by p.position)
                   from step_edges e join steps p on p.id = e.parent_id
                  where e.child_id = s.id), '[]'::jsonb) as parents,
       now() as db_now
from steps s
where s.task_id = any($1::uuid[])
order by s.task_id, s.position
