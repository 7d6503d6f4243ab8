-- For this transaction, tells the history delete triggers to leave the rows that partitions ending by the cutoff hold to their drop (delete_step_history() in sql/functions).
-- $1 timestamptz cutoff. Returns one row: drop_below, the latest partition bound at or before the cutoff and an hour ago ('' when none).
select set_config('stepbroker.history_drop_below',
                  coalesce((select max(h.range_to) from history_partitions() h
                            where not h.is_default and h.range_to <= least($1::timestamptz, now() - interval '1 hour'))::text, ''),
                  true) as drop_below
