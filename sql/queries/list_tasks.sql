-- Lists tasks newest first, one page at a time (keyset on the time-ordered id), filtered by state, template and text, for the dashboard.
-- $1 text state or null; $2 text template "namespace/name" or "name", or null; $3 text case-insensitive substring of the id, idempotency key or context, or null; $4 uuid only tasks older than this id, or null; $5 int page size.
select t.id, t.state, t.priority, t.idempotency_key, t.error, t.created_at, t.finished_at,
       tt.namespace, tt.name, tt.version,
       (select count(*)::int from steps s where s.task_id = t.id) as steps_total,
       (select count(*)::int from steps s
         where s.task_id = t.id and s.state in ('complete', 'resolved_manually')) as steps_done
from tasks t
join task_templates tt on tt.id = t.template_id
where ($1::text is null or t.state = $1::text)
  and ($2::text is null or tt.namespace || '/' || tt.name = $2::text or tt.name = $2::text)
  and ($3::text is null
       or strpos(t.id::text, lower($3::text)) > 0
       or strpos(lower(coalesce(t.idempotency_key, '')), lower($3::text)) > 0
       or strpos(lower(t.context::text), lower($3::text)) > 0)
  and ($4::uuid is null or t.id < $4::uuid)
order by t.id desc
limit $5::int
