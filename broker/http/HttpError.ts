/** Refusals the HTTP side answers with a JSON error body. */
/** A refusal with its HTTP status and a code the client can branch on. */
export class HttpError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}
