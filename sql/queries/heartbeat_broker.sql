-- A broker's heartbeat: its row's last_heartbeat_at becomes now (a stopped row is left alone: the broker must register again).
-- $1 text broker id. Returns one row when the broker's live row was there, none when it vanished or was marked stopped.
update brokers set last_heartbeat_at = now()
where broker_id = $1::text and stopped_at is null
returning broker_id
