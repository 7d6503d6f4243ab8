-- Locks one task (given directly, or as the task of a step) before its steps change, and returns its state.
-- $1 uuid task id (null: use $2), $2 uuid step id. Returns (id, state), or no row when there is no such task.
select t.id, t.state
from tasks t
where t.id = coalesce($1::uuid, (select s.task_id from steps s where s.id = $2::uuid))
for update
