-- Reads tasks with their template references: one for a view, or a statement's worth for the replies to a batch of SUBMITs.
-- $1 uuid[] task ids. Returns one row per task found, in no particular order.
select t.id, t.state, t.context, t.priority, t.idempotency_key, t.error, t.created_at, t.finished_at,
       tt.namespace, tt.name, tt.version
from tasks t
join task_templates tt on tt.id = t.template_id
where t.id = any($1::uuid[])
