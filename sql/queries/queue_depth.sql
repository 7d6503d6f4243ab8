-- Counts the ready steps of each handler and how long the oldest has been runnable, for the queue-depth metric and the dashboard.
-- No parameters. Returns one row per handler with ready steps (a walk of the partial index steps_ready only).
select s.handler, count(*)::int as ready,
       greatest(0, extract(epoch from now() - min(s.run_at)))::float8 as oldest_age_seconds
from steps s
where s.state = 'ready'
group by s.handler
order by s.handler
