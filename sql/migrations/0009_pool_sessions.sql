-- 0009_pool_sessions: a pool_id is bound to the session secret of the pool process that holds it.
-- Runs once, in a transaction under an advisory lock, with search_path set to the target schema. Never edit it once released.
--
-- zeromq.js cannot tell which CURVE key sent a message, so a pool proves that it is the process
-- that holds a pool_id with a secret it sends in every HELLO (HELLO.session; PROTOCOL.md,
-- Ownership). Only a hash of it is kept, here rather than in the broker's memory, so that a broker
-- that restarted (or another broker on this database) still refuses a HELLO that would adopt
-- another process's attempts.
create table pool_sessions (
  pool_id text primary key,
  -- sha256 of the secret, hex; the secret itself is never stored or logged.
  session_hash text not null,
  updated_at timestamptz not null default now()
);

-- take_pool_session(), which judges a HELLO's session against this table, lives in
-- sql/functions/take_pool_session.sql.
