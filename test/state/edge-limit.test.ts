/**
 * The edge bomb: a template's dependency edges are bounded at registration
 * (and at task creation, for a template stored before the bound existed), and
 * a task at the bound is created with every edge in place.
 */
import assert from "node:assert/strict";
import { StateError } from "../../broker/state/errors";
import { MAX_TEMPLATE_EDGES, TemplateError, TemplateErrorCodes } from "../../broker/state/templates";
import { useStateManager } from "../support/db";
import { linkedSteps, templateAtEdgeLimit } from "../support/denseTemplates";

describe("template edge limit", () => {
  const t = useStateManager("edge_limit");

  it(`refuses to register a template with more than ${MAX_TEMPLATE_EDGES} edges, naming the limit`, async () => {
    await assert.rejects(t.sm.registerTemplate(templateAtEdgeLimit("over", 1)), (err: unknown) => {
      assert.ok(err instanceof TemplateError, String(err));
      assert.equal(err.code, TemplateErrorCodes.TOO_MANY_EDGES);
      assert.match(
        err.message,
        new RegExp(`${MAX_TEMPLATE_EDGES + 1} dependency edges.*the limit is ${MAX_TEMPLATE_EDGES}`),
      );
      return true;
    });
    const rows = await t.sql("select 1 from task_templates where name = 'over'");
    assert.equal(rows.length, 0);
  });

  it("refuses the every-step-depends-on-every-earlier-one shape at once", async () => {
    await assert.rejects(
      t.sm.registerTemplate({
        namespace: "bomb",
        name: "dense",
        version: "1",
        steps: linkedSteps(1000, 1000),
      }),
      (err: unknown) => err instanceof TemplateError && err.code === TemplateErrorCodes.TOO_MANY_EDGES,
    );
  });

  it("creates a task at the limit with every edge and parent count in place", async function () {
    this.timeout(60_000);
    const def = templateAtEdgeLimit("at");
    await t.sm.registerTemplate(def);
    const [taskId] = await t.sm.createTasks([{ namespace: "bomb", name: "at", context: {} }]);
    const [count] = await t.sql<{ n: string }>(
      "select count(*) as n from step_edges e join steps c on c.id = e.child_id where c.task_id = $1",
      [taskId],
    );
    assert.equal(Number(count!.n), MAX_TEMPLATE_EDGES);
    // Each stored edge joins the steps the template names, by name.
    const stored = await t.sql<{ child: string; parent: string }>(
      `select c.name as child, p.name as parent from step_edges e
         join steps c on c.id = e.child_id join steps p on p.id = e.parent_id where c.task_id = $1`,
      [taskId],
    );
    const expected = new Set(def.steps.flatMap((s) => s.depends_on.map((d) => `${s.name}<-${d}`)));
    assert.deepEqual(new Set(stored.map((r) => `${r.child}<-${r.parent}`)), expected);
    const steps = await t.sql<{ name: string; pending_parents: number; state: string }>(
      "select name, pending_parents, state from steps where task_id = $1",
      [taskId],
    );
    for (const s of steps) {
      const want = def.steps.find((d) => d.name === s.name)!.depends_on.length;
      assert.equal(s.pending_parents, want, s.name);
      assert.equal(s.state, want === 0 ? "ready" : "pending", s.name);
    }
  });

  it("refuses to create a task from a template stored over the limit before the limit existed", async () => {
    const def = templateAtEdgeLimit("legacy", 5);
    // Written past the validation, as a database from before the limit may hold it.
    await t.sql("insert into task_templates (namespace, name, version, definition) values ($1, $2, $3, $4)", [
      def.namespace,
      def.name,
      def.version,
      JSON.stringify(def),
    ]);
    await assert.rejects(
      t.sm.createTask({ namespace: "bomb", name: "legacy", context: {} }),
      (err: unknown) => {
        assert.ok(err instanceof StateError, String(err));
        assert.equal(err.code, "invalid_request");
        assert.match(
          err.message,
          new RegExp(`${MAX_TEMPLATE_EDGES + 5} dependency edges; the limit is ${MAX_TEMPLATE_EDGES}`),
        );
        return true;
      },
    );
  });
});
