-- Extends, by each step's timeout from now, the lease of every given attempt that still holds one and was sent to the given pool; rows are locked in id order so concurrent extensions cannot deadlock.
-- $1 uuid[] attempt ids, $2 text the pool's id (null: any pool's). Returns the attempt ids whose lease was extended.
with held as (
  select s.id
  from steps s
  where s.lease_attempt_id = any($1::uuid[]) and s.state = 'in_progress'
    and ($2::text is null or s.lease_pool_id is null or s.lease_pool_id = $2::text)
  order by s.id
  for update of s
)
update steps s
set lease_expires_at = now() + s.timeout_ms * interval '1 millisecond'
from held
where s.id = held.id and s.state = 'in_progress'
returning s.lease_attempt_id as attempt_id
