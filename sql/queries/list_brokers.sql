-- Every broker row, with whether it is alive (not stopped, heartbeat within the bound) and how many in-flight steps it leases.
-- $1 int dead after this many ms without a heartbeat. Returns one row per broker, oldest start first.
select b.broker_id, b.endpoints, b.version, b.pid, b.host, b.started_at, b.last_heartbeat_at, b.stopped_at,
       floor(extract(epoch from now() - b.last_heartbeat_at) * 1000)::float8 as heartbeat_age_ms,
       b.stopped_at is null and b.last_heartbeat_at >= now() - $1::int * interval '1 millisecond' as alive,
       (select count(*) from steps s where s.state = 'in_progress' and s.lease_broker_id = b.broker_id)::int as in_flight
from brokers b
order by b.started_at, b.broker_id
