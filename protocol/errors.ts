import { ErrorCodes, type ErrorCode } from "./constants";
import type { ErrorBody } from "./types.generated";

/**
 * A protocol-level failure, returned (never thrown) by the decoders so a
 * receiver can answer with ERROR and go on serving everyone else.
 */
export interface ProtocolFault {
  code: ErrorCode;
  message: string;
  command?: string;
  schemaPath?: string;
  instancePath?: string;
  /** The attempt a fault inside a RESULT concerns, when the body names it. */
  attemptId?: string;
  /** A client's request_id, when the body was read far enough to know it. */
  requestId?: string;
}

export function fault(
  code: ErrorCode,
  detail?: string,
  extra: Omit<ProtocolFault, "code" | "message"> = {},
): ProtocolFault {
  const hint = ErrorCodes[code];
  return { code, message: detail ? `${detail}. ${hint}` : hint, ...extra };
}

/** The ERROR body that tells the peer about a fault. */
export function faultToErrorBody(
  f: ProtocolFault,
  ids: { attempt_id?: string; request_id?: string } = {},
): ErrorBody {
  const body: ErrorBody = { code: f.code, message: f.message.slice(0, 8192) };
  if (f.command) body.command = f.command.slice(0, 64);
  if (f.schemaPath) body.schema_path = f.schemaPath.slice(0, 1024);
  if (f.instancePath !== undefined) body.instance_path = f.instancePath.slice(0, 1024);
  const attemptId = ids.attempt_id ?? f.attemptId;
  if (attemptId) body.attempt_id = attemptId;
  const requestId = ids.request_id ?? f.requestId;
  if (requestId) body.request_id = requestId;
  return body;
}

/** Turns anything caught into an Error, keeping the original as `cause`. */
export function coerceError(e: unknown): Error {
  if (e instanceof Error) return e;
  return new Error(typeof e === "string" ? e : JSON.stringify(e), { cause: e });
}
