-- The oldest task still present, which holds back retention's drop of the history partitions after its creation.
-- No parameters. Returns at most one row: id, state, created_at.
select t.id, t.state, t.created_at from tasks t order by t.created_at, t.id limit 1
