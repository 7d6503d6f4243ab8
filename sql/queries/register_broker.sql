-- Registers a broker (or takes its row over after a restart under the same id): started and heartbeat now, not stopped.
-- $1 text broker id, $2 text[] endpoints, $3 text version, $4 int pid, $5 text host. Returns (started_at).
insert into brokers (broker_id, endpoints, version, pid, host, started_at, last_heartbeat_at, stopped_at)
values ($1::text, $2::text[], $3::text, $4::int, $5::text, now(), now(), null)
on conflict (broker_id) do update
set endpoints = excluded.endpoints, version = excluded.version, pid = excluded.pid, host = excluded.host,
    started_at = now(), last_heartbeat_at = now(), stopped_at = null
returning started_at
