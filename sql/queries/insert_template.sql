-- Registers a template unless its namespace/name/version exists; then returns the existing one and whether its definition is the same.
-- $1 text namespace, $2 text name, $3 text version, $4 text normalized definition as JSON text. Returns one row (none if a concurrent registration is not yet visible: run again).
with inserted as (
  insert into task_templates (namespace, name, version, definition)
  values ($1::text, $2::text, $3::text, $4::jsonb)
  on conflict (namespace, name, version) do nothing
  returning id, namespace, name, version, definition, created_at
)
select i.*, true as inserted, true as same from inserted i
union all
select t.id, t.namespace, t.name, t.version, t.definition, t.created_at, false, t.definition = $4::jsonb
from task_templates t
where not exists (select 1 from inserted)
  and t.namespace = $1::text and t.name = $2::text and t.version = $3::text
