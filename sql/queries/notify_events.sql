-- Sends the given payloads on a NOTIFY channel; delivered when (and only if) the transaction commits.
-- $1 text channel, $2 text[] payloads (each under 8000 bytes). Returns one row: how many were sent.
select count(pg_notify($1::text, p))::int as sent from unnest($2::text[]) as p
