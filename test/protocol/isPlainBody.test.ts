/**
 * isPlainBody may only ever say "valid" where the schema says so too: it lets
 * STEP and ACK bodies skip Ajv. Held against every vector of every command,
 * against near misses of a usual STEP and ACK (one field wrong at a time,
 * each also run through validateBody to show the answer is Ajv's), and
 * proven to take the usual shapes at all, so the fast path is not dead code.
 */
import { strict as assert } from "node:assert";
import { readdirSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { Ajv2020, type ValidateFunction } from "ajv/dist/2020.js";
import { COMMAND_NAMES, COMMAND_SCHEMAS, type CommandName } from "../../protocol/constants";
import { isPlainBody } from "../../protocol/isPlainBody";
import { loadSchemaFiles, SCHEMA_ID_PREFIX } from "../../protocol/schemaFiles";
import { validateBody } from "../../protocol/validateBody";

const VECTOR_DIR = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "protocol", "vectors");

/** The schemas compiled on their own, as validateBody compiles them, with no fast path in front. */
function ajvValidators(): Map<CommandName, ValidateFunction> {
  const ajv = new Ajv2020({ allErrors: false, strict: true, strictRequired: false, allowUnionTypes: true });
  for (const { schema } of loadSchemaFiles()) ajv.addSchema(schema);
  return new Map(
    COMMAND_NAMES.map((c) => [
      c,
      ajv.getSchema(SCHEMA_ID_PREFIX + COMMAND_SCHEMAS[c].replace(/\.json$/, ""))!,
    ]),
  );
}
const ajv = ajvValidators();

const clone = <T>(v: T): T => structuredClone(v);

function usualStep(): Record<string, unknown> {
  return {
    task_id: "17579317-5937-4128-866e-8c956a710cd7",
    step_id: "0548ad04-b317-4aca-8a9d-8285fe5be4b4",
    attempt_id: "531ac605-1676-4393-a994-cd6f249a69f9",
    step_name: "work",
    handler: "noop",
    attempt: 1,
    max_attempts: 3,
    timeout_ms: 30000,
    template: { namespace: "bench", name: "one", version: "1" },
    context: { n: 1 },
    config: {},
    inputs: { a: null },
    trace: { traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" },
  };
}
const usualAck = (): Record<string, unknown> => ({
  attempt_id: "531ac605-1676-4393-a994-cd6f249a69f9",
  outcome: "stored",
});

type Mutation = [string, (item: Record<string, unknown>) => void];

const BAD_IDS: unknown[] = [
  "531AC605-1676-4393-A994-CD6F249A69F9",
  "531ac605-1676-4393-a994-cd6f249a69f",
  "531ac605-1676-4393-a994-cd6f249a69f9 ",
  "531ac605167643934a994cd6f249a69f9xxx",
  "531ac605-1676-4393-a994-cd6f249a69g9",
  "\n531ac605-1676-4393-a994-cd6f249a69f",
  36,
  null,
  ["531ac605-1676-4393-a994-cd6f249a69f9"],
];
const BAD_NAMES: unknown[] = ["", "9lives", "a b", "x".repeat(129), "é", "a\n", 7, null, {}];
const BAD_COUNTS: unknown[] = [0, -1, 1.5, "1", null, Number.NaN, true, [1]];
const BAD_OBJECTS: unknown[] = [null, [], "{}", 1, true];
const BAD_TRACEPARENTS: unknown[] = [
  "00-00000000000000000000000000000000-b7ad6b7169203331-01",
  "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
  "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
  "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
  "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1",
  "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-",
  "00-0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331-01",
  55,
  null,
];

function stepMutations(): Mutation[] {
  const out: Mutation[] = [];
  for (const key of ["task_id", "step_id", "attempt_id"])
    for (const v of BAD_IDS) out.push([`${key} = ${JSON.stringify(v)}`, (s) => void (s[key] = v)]);
  for (const key of ["step_name", "handler"])
    for (const v of BAD_NAMES) out.push([`${key} = ${JSON.stringify(v)}`, (s) => void (s[key] = v)]);
  for (const key of ["attempt", "max_attempts", "timeout_ms"])
    for (const v of BAD_COUNTS) out.push([`${key} = ${String(v)}`, (s) => void (s[key] = v)]);
  for (const key of ["template", "context", "config", "inputs", "trace"])
    for (const v of BAD_OBJECTS) out.push([`${key} = ${JSON.stringify(v)}`, (s) => void (s[key] = v)]);
  for (const key of Object.keys(usualStep()).filter((k) => k !== "trace"))
    out.push([`without ${key}`, (s) => void delete s[key]]);
  out.push(["an extra key", (s) => void (s.priority = 1)]);
  out.push(["an extra key in place of trace", (s) => void (delete s.trace, (s.tracing = {}))]);
  const template = (f: (t: Record<string, unknown>) => void): Mutation[1] => {
    return (s) => f(s.template as Record<string, unknown>);
  };
  for (const key of ["namespace", "name"])
    for (const v of BAD_NAMES)
      out.push([`template.${key} = ${JSON.stringify(v)}`, template((t) => void (t[key] = v))]);
  for (const v of ["", "-1", "v".repeat(65), "1 ", 1, null])
    out.push([`template.version = ${JSON.stringify(v)}`, template((t) => void (t.version = v))]);
  for (const key of ["namespace", "name", "version"])
    out.push([`template without ${key}`, template((t) => void delete t[key])]);
  out.push(["template with an extra key", template((t) => void (t.id = "x"))]);
  const trace = (f: (t: Record<string, unknown>) => void): Mutation[1] => {
    return (s) => f(s.trace as Record<string, unknown>);
  };
  for (const v of BAD_TRACEPARENTS)
    out.push([`trace.traceparent = ${JSON.stringify(v)}`, trace((t) => void (t.traceparent = v))]);
  out.push(["trace without traceparent", trace((t) => void delete t.traceparent)]);
  out.push(["trace with an extra key", trace((t) => void (t.baggage = "a=b"))]);
  for (const v of ["x".repeat(513), "caf\u00e9=1", "a=1\n", 1, null])
    out.push([`trace.tracestate = ${JSON.stringify(v).slice(0, 40)}`, trace((t) => void (t.tracestate = v))]);
  return out;
}

function ackMutations(): Mutation[] {
  const out: Mutation[] = [];
  for (const v of BAD_IDS) out.push([`attempt_id = ${JSON.stringify(v)}`, (a) => void (a.attempt_id = v)]);
  for (const v of ["STORED", "", "lost", 1, null])
    out.push([`outcome = ${JSON.stringify(v)}`, (a) => void (a.outcome = v)]);
  out.push(["without attempt_id", (a) => void delete a.attempt_id]);
  out.push(["without outcome", (a) => void delete a.outcome]);
  out.push(["an extra key", (a) => void (a.note = "x")]);
  return out;
}

/** The body refused with Ajv's answer, and isPlainBody not claiming it. */
function assertRefusedAsAjvDoes(command: CommandName, body: unknown, what: string): void {
  const fn = ajv.get(command)!;
  assert.equal(fn(body), false, `${command} ${what}: the mutation should be invalid`);
  assert.equal(isPlainBody(command, body), false, `${command} ${what}: isPlainBody said valid`);
  const got = validateBody(command, body);
  assert.equal(got.ok, false, `${command} ${what}: validateBody accepted it`);
  if (got.ok) return;
  assert.equal(got.fault.code, "schema_violation");
  assert.equal(got.fault.instancePath, fn.errors?.[0]?.instancePath ?? "", `${command} ${what}`);
}

describe("protocol isPlainBody (the STEP and ACK fast path in front of Ajv)", () => {
  it("says valid only for vector bodies the schema accepts, and never for an invalid vector", () => {
    let plain = 0;
    for (const file of readdirSync(VECTOR_DIR).filter((f) => f.endsWith(".json") && f !== "frames.json")) {
      const v = JSON.parse(readFileSync(join(VECTOR_DIR, file), "utf8")) as {
        command: CommandName;
        valid: { name: string; body: unknown }[];
        invalid: { name: string; body: unknown }[];
      };
      const fn = ajv.get(v.command)!;
      for (const { name, body } of [...v.valid, ...v.invalid]) {
        if (!isPlainBody(v.command, body)) continue;
        plain++;
        assert.equal(fn(body), true, `${v.command} "${name}": isPlainBody said valid, Ajv did not`);
      }
      for (const { name, body } of v.invalid)
        assert.equal(isPlainBody(v.command, body), false, `${v.command} invalid "${name}"`);
    }
    assert.ok(plain >= 3, `only ${plain} vector bodies took the fast path`);
  });

  it("takes a usual STEP (with and without trace and tracestate) and ACK, 64 items a body", () => {
    const steps = Array.from({ length: 64 }, usualStep);
    assert.equal(isPlainBody("STEP", { steps }), true);
    const untraced = steps.map((s) => (({ trace: _t, ...rest }) => rest)(s));
    assert.equal(isPlainBody("STEP", { steps: untraced }), true);
    const withState = clone(steps);
    (withState[0]!.trace as Record<string, unknown>).tracestate = "vendor=abc, other=1";
    assert.equal(isPlainBody("STEP", { steps: withState }), true);
    for (const outcome of ["stored", "duplicate", "stale", "unknown"])
      assert.equal(isPlainBody("ACK", { acks: [{ ...usualAck(), outcome }] }), true);
    assert.equal(isPlainBody("RESULT", { results: [] }), false, "only STEP and ACK have a fast path");
  });

  it("refuses every near miss of a STEP item, and validateBody answers it as Ajv does", () => {
    const mutations = stepMutations();
    for (const [what, mutate] of mutations) {
      const bad = usualStep();
      mutate(bad);
      // the bad item last, after good ones: the whole list is checked
      assertRefusedAsAjvDoes("STEP", { steps: [usualStep(), usualStep(), bad] }, what);
    }
    assert.ok(mutations.length > 100);
  });

  it("refuses every near miss of an ACK item, and of either envelope", () => {
    for (const [what, mutate] of ackMutations()) {
      const bad = usualAck();
      mutate(bad);
      assertRefusedAsAjvDoes("ACK", { acks: [usualAck(), bad] }, what);
    }
    for (const [command, key, item] of [
      ["STEP", "steps", usualStep()],
      ["ACK", "acks", usualAck()],
    ] as const) {
      assertRefusedAsAjvDoes(command, { [key]: [] }, "an empty list");
      assertRefusedAsAjvDoes(command, { [key]: Array.from({ length: 10_001 }, () => item) }, "10,001 items");
      assertRefusedAsAjvDoes(command, { [key]: [item], extra: 1 }, "an extra top-level key");
      assertRefusedAsAjvDoes(command, { [key]: item }, "an item in place of the list");
      assertRefusedAsAjvDoes(command, {}, "no list");
      assertRefusedAsAjvDoes(command, [item], "a bare list");
    }
  });
});
