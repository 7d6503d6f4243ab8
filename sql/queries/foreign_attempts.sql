-- The attempts among the given ones that were sent to another pool than the given one (their pool_id is recorded and differs).
-- $1 uuid[] attempt ids, $2 text the asking pool's id. Returns attempt_id and the owner's pool_id.
select a.attempt_id, a.pool_id
from step_attempts a
where a.attempt_id = any($1::uuid[]) and a.pool_id is not null and a.pool_id <> $2::text
