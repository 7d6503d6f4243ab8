-- Adopts the attempts a reconnecting pool still holds: each that still holds its step's lease and was sent to this pool has the lease renewed (the step's timeout from now) under this broker's id.
-- $1 uuid[] attempt ids, $2 text broker id, $3 text the pool's id (null: any pool's). Returns the adopted attempts with what the broker tracks of them in flight.
with held as (
  select s.id
  from steps s
  where s.lease_attempt_id = any($1::uuid[]) and s.state = 'in_progress'
    and ($3::text is null or s.lease_pool_id is null or s.lease_pool_id = $3::text)
  order by s.id
  for update of s
)
update steps s
set lease_expires_at = now() + s.timeout_ms * interval '1 millisecond', lease_broker_id = $2::text
from held
where s.id = held.id
returning s.lease_attempt_id as attempt_id, s.id as step_id, s.task_id, s.name as step_name, s.handler,
  s.attempts as attempt, s.max_attempts
