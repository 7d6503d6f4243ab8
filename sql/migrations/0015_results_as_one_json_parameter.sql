-- 0015_results_as_one_json_parameter: complete_results() takes a batch's results as one jsonb array instead of eight parallel arrays.
-- Runs once, in a transaction under an advisory lock, with search_path set to the target schema. Never edit it once released.
--
-- The broker built eight JS arrays per batch and the driver wrote each as an array literal,
-- escaping every output and error a second time: a visible part of the broker's CPU per step.
-- One JSON text is built in one pass (each output is stringified once, as its byte count needs
-- anyway) and unpacked by jsonb_array_elements. A new signature is a new function: the old one
-- goes here, and sql/functions/complete_results.sql defines the new one after the migrations.
drop function complete_results(uuid[], text[], text[], text[], float8[], text[], text[], int[], text, text, text[], int);
