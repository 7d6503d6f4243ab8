-- The attempts among the given ones that were sent to another pool than the given one (their pool_id is recorded and differs).
-- $1 uuid[] attempt ids, $2 text the asking pool's id. Returns attempt_id and the owner's pool_id.
-- A running attempt's pool is on its step's lease (0013); only the ids no lease holds are looked up among
-- the ended attempts, whose rows are partitioned by time (one probe of each partition's key).
with running as (
  select s.lease_attempt_id as attempt_id, s.lease_pool_id as pool_id
  from steps s
  where s.lease_attempt_id = any($1::uuid[])
)
select r.attempt_id, r.pool_id
from running r
where r.pool_id is not null and r.pool_id <> $2::text
union all
select a.attempt_id, a.pool_id
from step_attempts a
where a.attempt_id = any(array(select x from unnest($1::uuid[]) x except select r.attempt_id from running r))
  and a.pool_id is not null and a.pool_id <> $2::text
