import assert from "node:assert/strict";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import {
  TemplateError,
  TemplateErrorCodes,
  loadTemplateFile,
  validateTemplate,
} from "../../broker/state/templates";
import { StateError } from "../../broker/state/errors";
import { useStateManager } from "../support/db";

const base = { namespace: "shop", name: "order", version: "1" };

function rejects(template: unknown, code: string, message: string): void {
  assert.throws(
    () => validateTemplate(template),
    (err: unknown) => {
      assert.ok(err instanceof TemplateError, String(err));
      assert.equal(err.code, code);
      assert.ok(
        err.problems.some((p) => p.message === message),
        `expected the problem "${message}", got ${JSON.stringify(err.problems.map((p) => p.message))}`,
      );
      return true;
    },
  );
}

describe("templates", () => {
  describe("validation", () => {
    it("fills in every default", () => {
      const def = validateTemplate({ ...base, steps: [{ name: "pay", handler: "payment" }] });
      assert.deepEqual(def.steps[0], {
        name: "pay",
        handler: "payment",
        depends_on: [],
        config: {},
        timeout_ms: 60000,
        retry: {
          max_attempts: 3,
          retryable: true,
          backoff: { initial_ms: 1000, multiplier: 2, max_ms: 300000, jitter: 0.2 },
        },
      });
    });

    it("does not change the object it is given", () => {
      const input = { ...base, steps: [{ name: "pay", handler: "payment" }] };
      validateTemplate(input);
      assert.deepEqual(input, { ...base, steps: [{ name: "pay", handler: "payment" }] });
    });

    it("rejects a dependency on an unknown step, naming both and where", () => {
      rejects(
        {
          ...base,
          steps: [
            { name: "a", handler: "h" },
            { name: "b", handler: "h" },
            { name: "c", handler: "h" },
            { name: "ship_order", handler: "h", depends_on: ["pay"] },
          ],
        },
        TemplateErrorCodes.UNKNOWN_DEPENDENCY,
        'step "ship_order" depends on unknown step "pay" (steps[3].depends_on[0])',
      );
    });

    it("rejects a step name used twice", () => {
      rejects(
        {
          ...base,
          steps: [
            { name: "a", handler: "h" },
            { name: "b", handler: "h" },
            { name: "a", handler: "h" },
          ],
        },
        TemplateErrorCodes.DUPLICATE_STEP,
        'step name "a" is used twice (steps[0].name and steps[2].name)',
      );
    });

    it("rejects a cycle, showing it", () => {
      rejects(
        {
          ...base,
          steps: [
            { name: "a", handler: "h", depends_on: ["c"] },
            { name: "b", handler: "h", depends_on: ["a"] },
            { name: "c", handler: "h", depends_on: ["b"] },
          ],
        },
        TemplateErrorCodes.CYCLE,
        'steps depend on each other in a cycle: "a" depends on "c" depends on "b" depends on "a" (steps[0].depends_on[0])',
      );
      rejects(
        { ...base, steps: [{ name: "self", handler: "h", depends_on: ["self"] }] },
        TemplateErrorCodes.CYCLE,
        'steps depend on each other in a cycle: "self" depends on "self" (steps[0].depends_on[0])',
      );
    });

    it("rejects a template without steps", () => {
      rejects({ ...base, steps: [] }, TemplateErrorCodes.EMPTY, "the template has no steps (steps)");
    });

    it("rejects what the schema forbids, with the path", () => {
      rejects(
        { ...base, steps: [{ name: "a" }] },
        TemplateErrorCodes.SCHEMA,
        'steps[0] is missing required property "handler"',
      );
      rejects(
        { ...base, steps: [{ name: "a", handler: "h", retry: { max_attempts: 0 } }] },
        TemplateErrorCodes.SCHEMA,
        "steps[0].retry.max_attempts must be >= 1",
      );
      rejects(
        { ...base, steps: [{ name: "a", handler: "h", retry: { backoff: { jitter: 2 } } }] },
        TemplateErrorCodes.SCHEMA,
        "steps[0].retry.backoff.jitter must be <= 1",
      );
      rejects(
        { ...base, steps: [{ name: "a", handler: "h", retries: 3 }] },
        TemplateErrorCodes.SCHEMA,
        'steps[0] has unknown property "retries"',
      );
      rejects(
        { namespace: "x", steps: [] },
        TemplateErrorCodes.SCHEMA,
        'the template is missing required property "name"',
      );
      rejects("not a template", TemplateErrorCodes.SCHEMA, "the template must be object");
    });

    it("loads YAML and JSON files, and names an unreadable one", async () => {
      const json = await loadTemplateFile("examples/templates/order.json");
      assert.equal(json.steps[1]?.retry.retryable, false);
      const yaml = await loadTemplateFile("examples/templates/tree.yaml");
      assert.equal(yaml.steps.length, 8);
      const dir = await fs.mkdtemp(path.join(os.tmpdir(), "stepbroker-templates-"));
      try {
        const bad = path.join(dir, "bad.yaml");
        await fs.writeFile(bad, "namespace: [unclosed\n");
        await assert.rejects(
          loadTemplateFile(bad),
          (e: unknown) => e instanceof TemplateError && e.code === TemplateErrorCodes.UNREADABLE,
        );
        const cyclic = path.join(dir, "cyclic.yaml");
        await fs.writeFile(
          cyclic,
          "namespace: x\nname: y\nversion: '1'\nsteps:\n  - {name: a, handler: h, depends_on: [a]}\n",
        );
        await assert.rejects(
          loadTemplateFile(cyclic),
          (e: unknown) => e instanceof TemplateError && e.code === TemplateErrorCodes.CYCLE,
        );
      } finally {
        await fs.rm(dir, { recursive: true, force: true });
      }
    });
  });

  describe("registration", () => {
    const t = useStateManager("templates");

    it("is idempotent for an identical definition and refuses a different one under the same version", async () => {
      const def = { ...base, steps: [{ name: "pay", handler: "payment" }] };
      const first = await t.sm.registerTemplate(def);
      const again = await t.sm.registerTemplate({
        ...def,
        steps: [{ handler: "payment", name: "pay", depends_on: [] }],
      });
      assert.equal(again.id, first.id, "the same definition once defaults are filled in");
      await assert.rejects(
        t.sm.registerTemplate({ ...def, steps: [{ name: "pay", handler: "other" }] }),
        (e: unknown) =>
          e instanceof TemplateError &&
          e.code === TemplateErrorCodes.CONFLICT &&
          /already registered/.test(e.message),
      );
      const racing = await Promise.all(
        [1, 2, 3, 4].map(() => t.sm.registerTemplate({ ...def, version: "race" })),
      );
      assert.equal(new Set(racing.map((r) => r.id)).size, 1);
    });

    it("creates tasks from the latest version unless one is named, and refuses unknown templates", async () => {
      await t.sm.registerTemplate({
        ...base,
        name: "versions",
        version: "1",
        steps: [{ name: "one", handler: "h" }],
      });
      await t.sm.registerTemplate({
        ...base,
        name: "versions",
        version: "2",
        steps: [{ name: "two", handler: "h" }],
      });
      const latest = await t.sm.createTask({ namespace: "shop", name: "versions", context: {} });
      assert.equal(latest.task.template.version, "2");
      assert.deepEqual(
        latest.task.steps?.map((s) => s.name),
        ["two"],
      );
      const pinned = await t.sm.createTask({
        namespace: "shop",
        name: "versions",
        version: "1",
        context: {},
      });
      assert.deepEqual(
        pinned.task.steps?.map((s) => s.name),
        ["one"],
      );
      await assert.rejects(
        t.sm.createTask({ namespace: "shop", name: "missing", context: {} }),
        (e: unknown) => e instanceof StateError && e.code === "unknown_template",
      );
      await assert.rejects(
        t.sm.createTask({
          namespace: "shop",
          name: "versions",
          context: [] as unknown as Record<string, never>,
        }),
        (e: unknown) => e instanceof StateError && e.code === "invalid_request",
      );
    });
  });
});
