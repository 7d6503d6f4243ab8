-- backoff_delay_ms: Retry delay in ms after the attempt-th failure of a step, from its backoff policy.
-- (initial_ms int, multiplier float8, max_ms int, jitter float8, attempt int) -> float8: initial * multiplier^(attempt-1), capped at max_ms, minus up to `jitter` of itself at random.
-- Live definition: applied after the numbered migrations whenever this file changes (broker/db/migrate.ts); last defined by a migration in 0001.
--
-- Retry delay after the attempt-th failure: initial * multiplier^(attempt-1), capped,
-- minus up to `jitter` of itself at random (so retries of many steps spread out).
create or replace function backoff_delay_ms(
  initial_ms integer, multiplier double precision, max_ms integer, jitter double precision, attempt integer
) returns double precision
language sql volatile
as $$
  select least(max_ms::double precision,
               initial_ms * power(multiplier, least(greatest(attempt - 1, 0), 60)))
         * (1 - jitter * random())
$$;
