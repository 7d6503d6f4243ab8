-- Locks, in id order, the tasks that have in-flight steps whose lease expired, and returns those steps' attempts.
-- $1 text only leases of this broker (null: any broker), $2 int most attempts. Returns (attempt_id, task_id).
with expired as (
  select s.task_id, s.lease_attempt_id
  from steps s
  where s.state = 'in_progress' and s.lease_expires_at < now()
    and ($1::text is null or s.lease_broker_id = $1::text)
  order by s.lease_expires_at
  limit $2
),
locked as (
  select t.id from tasks t where t.id in (select e.task_id from expired e) order by t.id for update
)
select e.lease_attempt_id as attempt_id, e.task_id from expired e where e.task_id in (select l.id from locked l)
