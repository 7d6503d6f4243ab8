-- A broker's clean stop: its row says stopped, with a last heartbeat of now, so its in-flight attempts may be reclaimed at once.
-- $1 text broker id. Returns one row when the broker had a row.
update brokers set stopped_at = now(), last_heartbeat_at = now()
where broker_id = $1::text
returning broker_id
