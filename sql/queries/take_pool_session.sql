-- Judges a HELLO's session against the one on record for its pool_id, recording it when it may take the pool_id (take_pool_session() in sql/functions).
-- $1 text pool id, $2 text sha256 hex of the session secret (null: the pool sent none). Returns one row: outcome.
select take_pool_session($1::text, $2::text) as outcome
