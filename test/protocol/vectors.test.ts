/**
 * Runs every file in protocol/vectors/ against our codec, the way PROTOCOL.md
 * ("Test vectors") asks every SDK to, and checks the files themselves are
 * well-formed and cover every command.
 */
import { strict as assert } from "node:assert";
import { readdirSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { Ajv2020 } from "ajv/dist/2020.js";
import {
  COMMAND_NAMES,
  COMMAND_SCHEMAS,
  ERROR_CODES,
  Encodings,
  type CommandName,
  type Encoding,
} from "../../protocol/constants";
import { decodeMessage, encodeMessage, type Decoded } from "../../protocol/codec";
import { validateBody } from "../../protocol/validateBody";
import { loadSchemaFiles, SCHEMA_ID_PREFIX } from "../../protocol/schemaFiles";

const VECTOR_DIR = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "protocol", "vectors");
const ENCODINGS: Encoding[] = [Encodings.JSON, Encodings.MSGPACK];
const MIN_INVALID_PER_COMMAND = 3;

interface ValidVector {
  name: string;
  body: Record<string, unknown>;
}
interface InvalidVector {
  name: string;
  body: Record<string, unknown>;
  error_code: string;
  instance_path: string;
  schema_keyword: string;
  schema_path: string;
}
interface CommandVectors {
  command: string;
  valid: ValidVector[];
  invalid: InvalidVector[];
}
type RawFrame = { text: string } | { hex: string };
interface FrameVectors {
  valid: { name: string; frames: RawFrame[]; command: string; body: Record<string, unknown> }[];
  invalid: { name: string; frames: RawFrame[]; error_code: string }[];
}

const FRAMES_FILE = "frames.json";
const vectorFiles = readdirSync(VECTOR_DIR)
  .filter((f) => f.endsWith(".json"))
  .sort();
const raw = new Map<string, unknown>(
  vectorFiles.map((f) => [f, JSON.parse(readFileSync(join(VECTOR_DIR, f), "utf8")) as unknown]),
);
const fileOf = (command: string): string => `${command.toLowerCase()}.json`;
const commandFiles = (): [CommandName, CommandVectors][] =>
  COMMAND_NAMES.filter((c) => raw.has(fileOf(c))).map((c) => [c, raw.get(fileOf(c)) as CommandVectors]);

// ---- shape checks for the files themselves -------------------------------------------------

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function assertKeys(
  where: string,
  v: unknown,
  keys: readonly string[],
): asserts v is Record<string, unknown> {
  assert.ok(isPlainObject(v), `${where} is not an object`);
  assert.deepEqual(
    Object.keys(v).sort(),
    [...keys].sort(),
    `${where} must have exactly the fields ${keys.join(", ")}`,
  );
}

function assertNamesUnique(where: string, items: { name: string }[]): void {
  const seen = new Set<string>();
  for (const { name } of items) {
    assert.ok(typeof name === "string" && name.length > 0, `${where}: a vector has no name`);
    assert.ok(!seen.has(name), `${where}: the name "${name}" is used twice`);
    seen.add(name);
  }
}

function checkCommandFile(file: string, v: unknown): void {
  assertKeys(file, v, ["command", "valid", "invalid"]);
  assert.equal(fileOf(String(v.command)), file, `${file} names command ${String(v.command)}`);
  assert.ok(Array.isArray(v.valid) && v.valid.length > 0, `${file}: valid must be a non-empty array`);
  assert.ok(Array.isArray(v.invalid), `${file}: invalid must be an array`);
  v.valid.forEach((x: unknown, i: number) => {
    assertKeys(`${file} valid[${i}]`, x, ["name", "body"]);
    assert.ok(isPlainObject(x.body), `${file} valid[${i}].body is not an object`);
  });
  v.invalid.forEach((x: unknown, i: number) => {
    const where = `${file} invalid[${i}]`;
    assertKeys(where, x, ["name", "body", "error_code", "instance_path", "schema_keyword", "schema_path"]);
    assert.ok(isPlainObject(x.body), `${where}.body is not an object`);
    assert.ok((ERROR_CODES as string[]).includes(String(x.error_code)), `${where}: unknown error_code`);
    assert.equal(typeof x.instance_path, "string");
    assert.ok(
      x.instance_path === "" || String(x.instance_path).startsWith("/"),
      `${where}: instance_path is not a JSON Pointer`,
    );
    assert.ok(
      typeof x.schema_keyword === "string" && x.schema_keyword.length > 0,
      `${where}: empty schema_keyword`,
    );
    assert.ok(
      typeof x.schema_path === "string" && x.schema_path.includes("#"),
      `${where}: schema_path has no #`,
    );
    assert.ok(
      String(x.schema_path).endsWith(`/${String(x.schema_keyword)}`),
      `${where}: schema_keyword is not the last segment of schema_path`,
    );
  });
  assertNamesUnique(`${file} valid`, v.valid as { name: string }[]);
  assertNamesUnique(`${file} invalid`, v.invalid as { name: string }[]);
}

function checkFrame(where: string, f: unknown): void {
  assert.ok(isPlainObject(f), `${where} is not an object`);
  const keys = Object.keys(f);
  assert.ok(
    keys.length === 1 && (keys[0] === "text" || keys[0] === "hex"),
    `${where} must be {text} or {hex}`,
  );
  if ("hex" in f) assert.match(String(f.hex), /^(?:[0-9a-f]{2})*$/, `${where}.hex is not lowercase hex`);
  else assert.equal(typeof f.text, "string", `${where}.text is not a string`);
}

function checkFramesFile(v: unknown): void {
  assertKeys(FRAMES_FILE, v, ["valid", "invalid"]);
  assert.ok(Array.isArray(v.valid) && Array.isArray(v.invalid) && v.invalid.length > 0);
  v.valid.forEach((x: unknown, i: number) => {
    assertKeys(`frames valid[${i}]`, x, ["name", "frames", "command", "body"]);
    assert.ok((COMMAND_NAMES as string[]).includes(String(x.command)), `frames valid[${i}]: unknown command`);
    assert.ok(Array.isArray(x.frames) && isPlainObject(x.body));
    x.frames.forEach((f: unknown, j: number) => checkFrame(`frames valid[${i}].frames[${j}]`, f));
  });
  v.invalid.forEach((x: unknown, i: number) => {
    assertKeys(`frames invalid[${i}]`, x, ["name", "frames", "error_code"]);
    assert.ok(
      (ERROR_CODES as string[]).includes(String(x.error_code)),
      `frames invalid[${i}]: unknown error_code`,
    );
    assert.ok(Array.isArray(x.frames));
    x.frames.forEach((f: unknown, j: number) => checkFrame(`frames invalid[${i}].frames[${j}]`, f));
  });
  assertNamesUnique("frames valid", v.valid as { name: string }[]);
  assertNamesUnique("frames invalid", v.invalid as { name: string }[]);
}

// ---- helpers ----------------------------------------------------------------------------

function frameBytes(f: RawFrame): Buffer {
  return "hex" in f ? Buffer.from(f.hex, "hex") : Buffer.from(f.text, "utf8");
}

/** decodeMessage must return faults, never throw; a throw fails the test with a clear message. */
function decodeSafely(frames: readonly Uint8Array[]): Decoded {
  try {
    return decodeMessage(frames);
  } catch (e) {
    assert.fail(
      `decodeMessage threw instead of returning a fault: ${e instanceof Error ? e.message : String(e)}`,
    );
  }
}

function roundTrip(command: CommandName, body: Record<string, unknown>, encoding: Encoding): Decoded {
  return decodeSafely(encodeMessage(command, body as never, encoding));
}

// An independent validator that reports every error: an invalid vector must have exactly one
// defect, so any validator (whatever order it checks keywords in) agrees on where and what.
let allErrorsAjv: Ajv2020 | undefined;
function errorsWithAllErrors(
  command: CommandName,
  body: unknown,
): { keyword: string; instancePath: string }[] {
  if (!allErrorsAjv) {
    allErrorsAjv = new Ajv2020({
      allErrors: true,
      strict: true,
      strictRequired: false,
      allowUnionTypes: true,
    });
    for (const { schema } of loadSchemaFiles()) allErrorsAjv.addSchema(schema);
  }
  const fn = allErrorsAjv.getSchema(SCHEMA_ID_PREFIX + COMMAND_SCHEMAS[command].replace(/\.json$/, ""))!;
  fn(body);
  // `if` errors only say that a `then` failed; the `then` error is the defect.
  return (fn.errors ?? []).filter((e) => e.keyword !== "if");
}

// ---- tests ------------------------------------------------------------------------------

describe("protocol test vectors (protocol/vectors/)", () => {
  describe("the vector files", () => {
    it("include one file per command in COMMAND_SCHEMAS, named after the command in lower case", () => {
      const missing = COMMAND_NAMES.filter((c) => !raw.has(fileOf(c)));
      assert.deepEqual(missing, [], `commands without a vector file: ${missing.join(", ")}`);
    });

    it("include no file that belongs to no command, except frames.json", () => {
      const known = new Set<string>([...COMMAND_NAMES.map(fileOf), FRAMES_FILE]);
      assert.deepEqual(
        vectorFiles.filter((f) => !known.has(f)),
        [],
      );
      assert.ok(raw.has(FRAMES_FILE), "frames.json is missing");
    });

    it("are well-formed: command, valid [{name, body}], invalid [{name, body, error_code, instance_path, schema_keyword, schema_path}]", () => {
      for (const [command] of commandFiles()) checkCommandFile(fileOf(command), raw.get(fileOf(command)));
    });

    it("frames.json is well-formed: valid [{name, frames, command, body}], invalid [{name, frames, error_code}]", () => {
      checkFramesFile(raw.get(FRAMES_FILE));
    });

    it(`give every command at least ${MIN_INVALID_PER_COMMAND} invalid vectors and at least one valid one`, () => {
      for (const [command, v] of commandFiles()) {
        assert.ok(v.valid.length >= 1, `${command} has no valid vector`);
        assert.ok(
          v.invalid.length >= MIN_INVALID_PER_COMMAND,
          `${command} has ${v.invalid.length} invalid vectors, fewer than ${MIN_INVALID_PER_COMMAND}`,
        );
      }
    });

    it("give every valid body in a shape the command's schema accepts", () => {
      for (const [command, v] of commandFiles()) {
        for (const { name, body } of v.valid) {
          const r = validateBody(command, body);
          assert.ok(r.ok, `${command} "${name}": ${r.ok ? "" : r.fault.message}`);
        }
      }
    });

    it("give every invalid body exactly one defect, so every validator names the same place and keyword", () => {
      for (const [command, v] of commandFiles()) {
        for (const vector of v.invalid) {
          const errors = errorsWithAllErrors(command, vector.body);
          assert.equal(
            errors.length,
            1,
            `${command} "${vector.name}" has ${errors.length} defects: ${JSON.stringify(errors)}`,
          );
          assert.equal(errors[0]!.instancePath, vector.instance_path, `${command} "${vector.name}"`);
          assert.equal(errors[0]!.keyword, vector.schema_keyword, `${command} "${vector.name}"`);
        }
      }
    });
  });

  for (const [command, vectors] of commandFiles()) {
    describe(`${command} (${fileOf(command)})`, () => {
      for (const { name, body } of vectors.valid) {
        it(`accepts "${name}" and gets the same body back in JSON and MessagePack`, () => {
          for (const encoding of ENCODINGS) {
            const r = roundTrip(command, body, encoding);
            assert.ok(r.ok, `${encoding}: ${r.ok ? "" : r.fault.message}`);
            assert.equal(r.encoding, encoding);
            assert.equal(r.message.command, command);
            assert.deepStrictEqual(r.message.body, body, `${encoding} round trip changed the body`);
          }
        });
      }

      for (const v of vectors.invalid) {
        it(`rejects "${v.name}" with ${v.error_code} at "${v.instance_path}" (${v.schema_keyword})`, () => {
          for (const encoding of ENCODINGS) {
            const r = roundTrip(command, v.body, encoding);
            assert.ok(!r.ok, `${encoding}: the body was accepted`);
            assert.equal(r.fault.code, v.error_code, `${encoding}: error_code`);
            assert.equal(r.fault.command, command, `${encoding}: command`);
            assert.equal(r.fault.instancePath, v.instance_path, `${encoding}: instance_path`);
            assert.equal(r.fault.schemaPath, v.schema_path, `${encoding}: schema_path`);
            assert.equal(
              r.fault.schemaPath?.split("/").pop(),
              v.schema_keyword,
              `${encoding}: schema_keyword`,
            );
          }
        });
      }
    });
  }

  describe("raw frames (frames.json)", () => {
    const frames = raw.get(FRAMES_FILE) as FrameVectors | undefined;
    for (const v of frames?.valid ?? []) {
      it(`decodes "${v.name}"`, () => {
        const r = decodeSafely(v.frames.map(frameBytes));
        assert.ok(r.ok, r.ok ? "" : r.fault.message);
        assert.equal(r.message.command, v.command);
        assert.deepStrictEqual(r.message.body, v.body);
      });
    }
    for (const v of frames?.invalid ?? []) {
      it(`rejects "${v.name}" with ${v.error_code}`, () => {
        const r = decodeSafely(v.frames.map(frameBytes));
        assert.ok(!r.ok, "the frames were accepted");
        assert.equal(r.fault.code, v.error_code, r.fault.message);
      });
    }
  });
});
