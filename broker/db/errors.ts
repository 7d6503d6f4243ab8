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

/**
 * True when PostgreSQL refused the data itself, so retrying the same rows
 * cannot help: SQLSTATE class 22 (data exception: untranslatable character,
 * invalid JSON text, ...) or 54 (program limit exceeded: too deep, too
 * large). A TypeError or RangeError was thrown while serializing the values.
 * Everything else (class 08, 57P01 admin shutdown, ECONNREFUSED, timeouts)
 * is about the connection, and running the same statement later may succeed.
 */
export function isDataError(e: unknown): boolean {
  // The state manager wraps the driver's error (name of the statement, `cause` the original).
  for (let err = e, i = 0; err && i < 5; err = (err as { cause?: unknown }).cause, i++) {
    if (err instanceof TypeError || err instanceof RangeError) return true;
    const code = (err as { code?: unknown }).code;
    if (typeof code === "string") return /^(22|54)[0-9A-Z]{3}$/.test(code);
  }
  return false;
}

/** The messages of an error and its causes, innermost last, with the SQLSTATE: "complete_attempts failed: unsupported Unicode escape sequence (SQLSTATE 22P05)". */
export function reasonOf(e: unknown): string {
  const parts: string[] = [];
  for (let err = e, i = 0; err && i < 5; err = (err as { cause?: unknown }).cause, i++) {
    const m = err instanceof Error ? err.message : String(err);
    if (!parts.includes(m)) parts.push(m);
  }
  return `${parts.join(": ").slice(0, 300)} (${codeOf(e)})`;
}

/** "SQLSTATE 22P05", or the error's name when PostgreSQL gave no code. */
export function codeOf(e: unknown): string {
  const code = pgErrorCode(e);
  return code !== undefined ? `SQLSTATE ${code}` : e instanceof Error ? e.name : "error";
}
