-- Counts the attempts that finished in each of the last minutes, by outcome, for the dashboard's overview.
-- $1 uuid the smallest attempt id to read (time-ordered: a bound some minutes before the window keeps the scan on the primary key's recent end); $2 int minutes.
select date_trunc('minute', a.finished_at) as minute, a.outcome, count(*)::int as n
from step_attempts a
where a.attempt_id >= $1::uuid
  and a.finished_at >= date_trunc('minute', now()) - make_interval(mins => $2::int)
group by 1, 2
order by 1, 2
