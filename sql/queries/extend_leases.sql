-- Extends, by each step's timeout from now, the lease of every given attempt that still holds one and was sent to the given pool; rows are locked in id order so concurrent extensions cannot deadlock.
-- $1 uuid[] attempt ids, $2 text the pool's id (null: any pool's). Returns the attempt ids whose lease was extended.
with held as (
  select s.id
  from step_attempts a
  join steps s on s.id = a.step_id
  where a.attempt_id = any($1::uuid[]) and s.lease_attempt_id = a.attempt_id and s.state = 'in_progress'
    and ($2::text is null or a.pool_id is null or a.pool_id = $2::text)
  order by s.id
  for update of s
)
update steps s
set lease_expires_at = now() + s.timeout_ms * interval '1 millisecond'
from held
where s.id = held.id and s.state = 'in_progress'
returning s.lease_attempt_id as attempt_id
