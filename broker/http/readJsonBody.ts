/**
 * A request's JSON body, at most `max` bytes (declared or streamed); an
 * empty body reads as {}. Refusals are HttpErrors the server answers as JSON.
 */
import type { IncomingMessage } from "node:http";
import { HttpError } from "./HttpError";

export async function readJsonBody(req: IncomingMessage, max: number): Promise<unknown> {
  const declared = Number(req.headers["content-length"] ?? "0");
  const tooLarge = () =>
    new HttpError(413, "body_too_large", `the body is larger than ${max} bytes; send a smaller output`);
  if (declared > max) {
    req.resume();
    throw tooLarge();
  }
  const chunks: Buffer[] = [];
  let size = 0;
  try {
    for await (const chunk of req as AsyncIterable<Buffer>) {
      size += chunk.length;
      if (size > max) {
        req.resume();
        throw tooLarge();
      }
      chunks.push(chunk);
    }
  } catch (e) {
    if (e instanceof HttpError) throw e;
    // the client went away mid-body: nobody is left to answer, and it is no server error
    throw new HttpError(400, "aborted", "the request body was cut off; send it again");
  }
  const text = Buffer.concat(chunks).toString("utf8");
  if (text.trim() === "") return {};
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new HttpError(
      400,
      "bad_json",
      `the body is not JSON (${(e as Error).message}); send a JSON object`,
    );
  }
}
