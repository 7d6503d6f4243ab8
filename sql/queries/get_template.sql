-- Finds a registered template by namespace, name and version, or the one registered last when no version is given.
-- $1 text namespace, $2 text name, $3 text version (null: latest). Returns one row, or none.
select t.id, t.namespace, t.name, t.version, t.definition, t.created_at
from task_templates t
where t.namespace = $1::text and t.name = $2::text and ($3::text is null or t.version = $3::text)
order by t.id desc
limit 1
