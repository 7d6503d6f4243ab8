-- Locks, in id order, the tasks that have in-flight steps leased by this broker id before a time (a previous life) or whose lease expired, and returns those attempts.
-- $1 text broker id, $2 timestamptz leases of $1 granted before this are orphans (null: now), $3 int most attempts, $4 uuid[] attempts to keep (adopted by reconnecting pools). Returns (attempt_id, task_id).
with orphans as (
  select s.task_id, s.lease_attempt_id
  from steps s
  where s.state = 'in_progress'
    and ((s.lease_broker_id = $1::text and s.lease_started_at < coalesce($2::timestamptz, now())) or s.lease_expires_at < now())
    and not (s.lease_attempt_id = any(coalesce($4::uuid[], '{}')))
  limit $3
),
locked as (
  select t.id from tasks t where t.id in (select o.task_id from orphans o) order by t.id for update
)
select o.lease_attempt_id as attempt_id, o.task_id from orphans o where o.task_id in (select l.id from locked l)
