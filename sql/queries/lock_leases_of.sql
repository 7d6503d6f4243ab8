-- Locks the in-flight steps whose lease is still held by the given attempt under the given broker, so a concurrent adoption (which moves the lease to another broker) is seen. Call with their tasks locked.
-- $1 uuid[] attempt ids, $2 text[] the broker id each was leased by. Returns (attempt_id) of those still so leased.
select s.lease_attempt_id as attempt_id
from unnest($1::uuid[], $2::text[]) as given(attempt_id, broker_id)
join steps s on s.lease_attempt_id = given.attempt_id
where s.state = 'in_progress'
  and s.lease_broker_id is not distinct from given.broker_id
order by s.id
for update of s
