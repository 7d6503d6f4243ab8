-- 0011_brokers: the brokers sharing this database, so that each can tell which others are alive.
-- Runs once, in a transaction under an advisory lock, with search_path set to the target schema. Never edit it once released.
--
-- A broker upserts its row at start and heartbeats it (BrokerRegistry, broker/state/); every live
-- broker reclaims the in-flight attempts of brokers whose heartbeat is too old (or that stopped).
-- A row is kept after a stop: `stepbroker brokers` shows it, and a broker restarted under the same
-- id takes it over.
create table brokers (
  broker_id text primary key,
  endpoints text[] not null default '{}',
  version text not null default '',
  pid int,
  host text not null default '',
  started_at timestamptz not null default now(),
  last_heartbeat_at timestamptz not null default now(),
  -- Set by a clean stop; a restart under the same id clears it.
  stopped_at timestamptz
);

-- The reclaimer looks up the broker of each in-flight step by this key (the primary key); in-flight
-- steps by broker are found through the existing steps_in_flight partial index, so no new index
-- on steps is needed (it would slow every claim and completion).
