-- Locks, in id order, the tasks of the given attempts, so that a later statement deciding whether a task is finished sees every concurrent change to its steps.
-- $1 uuid[] attempt ids. Returns the locked task ids.
select t.id
from tasks t
where t.id = any(array(select s.task_id from steps s where s.lease_attempt_id = any($1::uuid[])))
order by t.id
for update
