-- Locks, in id order and skipping tasks another transaction holds, the tasks with in-flight steps leased by a dead, stopped or unregistered broker other than the caller; returns those attempts.
-- $1 text the caller's broker id, $2 int dead after ms without a heartbeat, $3 int most attempts. Returns (attempt_id, task_id, broker_id, heartbeat_age_ms: null for no row).
with lost as (
  select s.task_id, s.lease_attempt_id, s.lease_broker_id,
         floor(extract(epoch from now() - b.last_heartbeat_at) * 1000)::float8 as heartbeat_age_ms
  from steps s
  left join brokers b on b.broker_id = s.lease_broker_id
  where s.state = 'in_progress'
    and s.lease_broker_id is distinct from $1::text
    and case
      -- No row: an older broker, or a previous life under another id. Only a lease that has been
      -- expired for the whole bound is taken (a live old broker reaps its own expired leases).
      when b.broker_id is null then s.lease_expires_at < now() - $2::int * interval '1 millisecond'
      -- A row: stopped, or silent for the bound. An attempt started after the last heartbeat proves
      -- the broker was alive then, so it is taken only once it too is older than the bound: a broker
      -- that claimed and died between two heartbeats does not leave its work to the lease.
      else (b.stopped_at is not null or b.last_heartbeat_at < now() - $2::int * interval '1 millisecond')
           and s.lease_started_at < greatest(b.last_heartbeat_at, now() - $2::int * interval '1 millisecond')
    end
  order by s.task_id, s.id
  limit $3::int
),
locked as (
  select t.id from tasks t where t.id in (select l.task_id from lost l) order by t.id for update skip locked
)
select l.lease_attempt_id as attempt_id, l.task_id, l.lease_broker_id as broker_id, l.heartbeat_age_ms
from lost l
where l.task_id in (select k.id from locked k)
