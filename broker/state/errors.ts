import type { ErrorCode } from "../../protocol/constants";

/**
 * A request the state manager refuses (unknown task, step in the wrong state…).
 * `code` is from the protocol's registry, so the broker can send it as is.
 */
export class StateError extends Error {
  override readonly name = "StateError";
  readonly code: ErrorCode;

  constructor(code: ErrorCode, message: string, options?: { cause?: Error }) {
    super(message, options);
    this.code = code;
  }
}
