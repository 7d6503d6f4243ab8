-- Deletes up to $2 tasks that finished before $1, with their steps (cascade) and their history (the delete triggers).
-- $1 timestamptz cutoff, $2 int batch size. Returns one row per task deleted: id.
delete from tasks
where id in (select t.id from tasks t where t.finished_at < $1::timestamptz limit $2::int)
returning id
