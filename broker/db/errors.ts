// One coerceError for the whole project: the protocol's.
export { coerceError } from "../../protocol/errors";

/** The SQLSTATE of a PostgreSQL error (or of the error it wraps), if any. */
export function pgErrorCode(err: unknown): string | undefined {
  for (let e: unknown = err, depth = 0; e !== null && typeof e === "object" && depth < 5; depth++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === "string" && /^[0-9A-Z]{5}$/.test(code)) return code;
    e = (e as { cause?: unknown }).cause;
  }
  return undefined;
}

/** 40P01 deadlock_detected and 40001 serialization_failure: the transaction may simply be run again. */
export function isRetryableTransactionError(err: unknown): boolean {
  const code = pgErrorCode(err);
  return code === "40P01" || code === "40001";
}
