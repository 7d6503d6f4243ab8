-- Reads one task with its template reference.
-- $1 uuid task id. Returns one row, or none.
select t.id, t.state, t.context, t.priority, t.idempotency_key, t.error, t.created_at, t.finished_at,
       tt.namespace, tt.name, tt.version
from tasks t
join task_templates tt on tt.id = t.template_id
where t.id = $1::uuid
