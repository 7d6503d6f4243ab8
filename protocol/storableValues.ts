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

/** Either character jsonb refuses may be here; one native scan, and most strings have neither. */
const SUSPECT = /[\0\ud800-\udfff]/;
const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/;
const UNSTORABLE = /\0|[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g;

/** U+0000 or a lone surrogate: what jsonb cannot store. Paired surrogates (emoji) are fine. */
function unstorableString(s: string): string | undefined {
  if (!SUSPECT.test(s)) return undefined;
  if (s.includes("\0")) return "U+0000";
  return LONE_SURROGATE.test(s) ? "an unpaired surrogate" : undefined;
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

/**
 * Text that jsonb can store: U+0000 and lone surrogates become U+FFFD. For
 * free text a peer only reports (an exception's message), where losing those
 * characters beats losing the whole result; apply it after truncating, since a
 * cut can split a surrogate pair.
 */
export function storableText(s: string): string {
  return SUSPECT.test(s) ? s.replace(UNSTORABLE, "\ufffd") : s;
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
  if (typeof value !== "object" || value === null) {
    if (typeof value === "number" && !Number.isFinite(value))
      return { code: "undecodable_body", what: "a non-finite number", path: [] };
    return typeof value === "number" || typeof value === "boolean" || value === null
      ? undefined
      : { code: "undecodable_body", what: `a value of type ${typeof value}`, path: [] };
  }
  if (depth > maxDepth) return { code: "too_deep", what: `nesting deeper than ${maxDepth} levels`, path: [] };
  if (Array.isArray(value)) {
    for (let i = 0; i < value.length; i++) {
      const v: unknown = value[i];
      // Plain scalars inline: most values are, and a call per value is most of the cost.
      if (typeof v === "boolean" || (typeof v === "number" && Number.isFinite(v))) continue;
      const p = valueProblem(v, maxDepth, depth + 1);
      if (p) {
        p.path.unshift(String(i));
        return p;
      }
    }
    return undefined;
  }
  if (Object.getPrototypeOf(value) !== Object.prototype)
    return { code: "undecodable_body", what: `a value of type ${typeName(value)}`, path: [] };
  const obj = value as Record<string, unknown>;
  const keys = Object.keys(obj);
  for (let i = 0; i < keys.length; i++) {
    const key = keys[i]!;
    const bad = unstorableString(key);
    if (bad) return { code: "unstorable_value", what: `an object key holds ${bad}`, path: [key] };
    const v = obj[key];
    if (typeof v === "boolean" || (typeof v === "number" && Number.isFinite(v))) continue;
    const p = valueProblem(v, maxDepth, depth + 1);
    if (p) {
      p.path.unshift(key);
      return p;
    }
  }
  return undefined;
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
