/**
 * What every decoded body must be, whatever its encoding: plain data that
 * PostgreSQL's jsonb can store. MessagePack can carry what JSON cannot
 * (binary, extension types such as timestamps, non-string keys); both
 * encodings can carry strings jsonb refuses (U+0000, and unpaired surrogates,
 * which JSON text writes as `\ud800` escapes). One such value in one result
 * would fail the whole group commit it lands in, so they are refused at the
 * door with a path to the value.
 *
 * One walk over the parsed body; a string costs an `includes` and a regular
 * expression test, both native. Paths are built only on the way out of a
 * failure, so a good body allocates nothing.
 */
import type { ErrorCode } from "./constants";

export interface ValueProblem {
  code: Extract<ErrorCode, "unstorable_value" | "undecodable_body" | "too_deep">;
  /** What is wrong, without the path. */
  what: string;
  /** JSON Pointer segments from the body to the value, innermost last once complete. */
  path: string[];
}

const SURROGATE = /[\ud800-\udfff]/;
const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/;
const UNSTORABLE = /\0|[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g;

/** U+0000 or a lone surrogate: what jsonb cannot store. Paired surrogates (emoji) are fine. */
function unstorableString(s: string): string | undefined {
  if (s.includes("\0")) return "U+0000";
  // Two native scans; the second, slower one only for the rare string with a surrogate at all.
  if (SURROGATE.test(s) && LONE_SURROGATE.test(s)) return "an unpaired surrogate";
  return undefined;
}

/**
 * A path segment as JSON Pointer text that is itself storable: U+0000 and lone
 * surrogates are written as `\uXXXX`, so an ERROR that names the key can be
 * sent, stored and decoded.
 */
function pointerSegment(key: string): string {
  return key
    .replace(/~/g, "~0")
    .replace(/\//g, "~1")
    .replace(UNSTORABLE, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);
}

export function pointer(path: readonly string[]): string {
  return path.map((p) => `/${pointerSegment(p)}`).join("");
}

function typeName(value: unknown): string {
  if (value instanceof Uint8Array) return "binary";
  if (value instanceof Date) return "timestamp extension";
  if (value instanceof Map) return "map with non-string keys";
  return typeof value;
}

/**
 * The first value in `value` that the protocol refuses, or undefined.
 * `maxDepth` bounds nesting here too (the byte scan has bounded it already;
 * this keeps the walk itself bounded whoever calls it).
 */
export function valueProblem(value: unknown, maxDepth: number, depth = 1): ValueProblem | undefined {
  if (typeof value === "string") {
    const what = unstorableString(value);
    return what ? { code: "unstorable_value", what: `a string holds ${what}`, path: [] } : undefined;
  }
  if (value === null || typeof value === "boolean") return undefined;
  if (typeof value === "number")
    return Number.isFinite(value)
      ? undefined
      : { code: "undecodable_body", what: "a non-finite number", path: [] };
  if (depth > maxDepth) return { code: "too_deep", what: `nesting deeper than ${maxDepth} levels`, path: [] };
  if (Array.isArray(value)) {
    for (let i = 0; i < value.length; i++) {
      const p = valueProblem(value[i], maxDepth, depth + 1);
      if (p) {
        p.path.unshift(String(i));
        return p;
      }
    }
    return undefined;
  }
  if (typeof value === "object" && Object.getPrototypeOf(value) === Object.prototype) {
    for (const key in value) {
      const bad = unstorableString(key);
      if (bad) return { code: "unstorable_value", what: `an object key holds ${bad}`, path: [key] };
      const p = valueProblem((value as Record<string, unknown>)[key], maxDepth, depth + 1);
      if (p) {
        p.path.unshift(key);
        return p;
      }
    }
    return undefined;
  }
  return { code: "undecodable_body", what: `a value of type ${typeName(value)}`, path: [] };
}

/** How many levels `value` nests (a scalar is 0, `{}` is 1), or `limit + 1` as soon as it passes `limit`. */
export function depthOf(value: unknown, limit: number): number {
  if (value === null || typeof value !== "object") return 0;
  if (limit <= 0) return 1;
  let max = 0;
  for (const v of Array.isArray(value) ? value : Object.values(value as Record<string, unknown>)) {
    const d = depthOf(v, limit - 1);
    if (d >= limit) return limit + 1;
    if (d > max) max = d;
  }
  return max + 1;
}
