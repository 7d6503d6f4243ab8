/**
 * The claim must keep its index-shaped plan on tables that have never been
 * analyzed: tasks arrive in bursts, and thousands of steps can exist before
 * autovacuum has looked at them once. A plan that reads the whole ready queue
 * (or a whole table) per claim turns draining a queue quadratic.
 */
import assert from "node:assert/strict";
import pg from "pg";
import { connectionConfig } from "../../broker/db/openDatabase";
import { loadQueries } from "../../broker/db/queries";
import { adminDatabaseUrl, useStateManager } from "../support/db";

/** The fields of an EXPLAIN (FORMAT JSON) node this file looks at. */
interface PlanNode {
  "Node Type": string;
  "Relation Name"?: string;
  "Index Name"?: string;
  "Join Filter"?: string;
  Plans?: PlanNode[];
}

const TABLES = ["steps", "tasks", "step_edges", "step_attempts", "step_transitions", "task_transitions"];

/** Four steps: b and c wait for a, d for both. */
const DIAMOND = {
  namespace: "p",
  name: "diamond",
  version: "1",
  steps: [
    { name: "a", handler: "h" },
    { name: "b", handler: "h", depends_on: ["a"] },
    { name: "c", handler: "h", depends_on: ["a"] },
    { name: "d", handler: "h", depends_on: ["b", "c"] },
  ],
};

/** Loads auto_explain on `client`, or skips the test where this role may not. */
async function loadAutoExplain(client: pg.ClientBase, test: Mocha.Context): Promise<void> {
  try {
    await client.query("load 'auto_explain'");
  } catch (err) {
    // The test run's embedded server gives a superuser URL; a DATABASE_URL of a role that may not load modules cannot.
    if ((err as { code?: string }).code === "42501") {
      console.warn("      (skipped: this database role may not load auto_explain, which shows the plans)");
      test.skip();
    }
    throw new Error("auto_explain is needed to see the plans inside claim_steps", { cause: err });
  }
}

describe("hot-path plans on tables never analyzed", function () {
  this.timeout(60_000);
  const t = useStateManager("plans");
  let client: pg.ClientBase;
  let release: () => Promise<void>;
  beforeEach(async () => {
    // Only a superuser may load auto_explain and set its options; DATABASE_URL is the broker's lesser role.
    const admin = adminDatabaseUrl();
    if (admin === undefined) {
      const pooled = await t.db.pool.connect();
      client = pooled;
      release = async () => pooled.release();
    } else {
      const own = new pg.Client(connectionConfig(admin, t.schema));
      await own.connect();
      client = own;
      release = () => own.end();
    }
  });
  afterEach(() => release());

  before(async () => {
    // storage parameters belong to a partitioned table's partitions, not to the table
    const relations = await t.sql<{ name: string }>(
      `select c.oid::regclass::text as name from pg_class c
       where c.relkind = 'r' and c.relnamespace = current_schema()::regnamespace
         and (c.relname = any($1::text[]) or exists (
           select 1 from pg_inherits i join pg_class p on p.oid = i.inhparent
           where i.inhrelid = c.oid and p.relname = any($1::text[])))`,
      [TABLES],
    );
    for (const { name } of relations) await t.sql(`alter table ${name} set (autovacuum_enabled = false)`);
    await t.sm.registerTemplate({
      namespace: "p",
      name: "one",
      version: "1",
      steps: [{ name: "w", handler: "h" }],
    });
    await t.sm.registerTemplate(DIAMOND);
    const ones = Array.from({ length: 2000 }, (_, n) => ({ namespace: "p", name: "one", context: { n } }));
    const diamonds = Array.from({ length: 6000 }, (_, n) => ({
      namespace: "p",
      name: "diamond",
      context: { n },
    }));
    await t.sm.createTasks(ones);
    await t.sm.createTasks(diamonds);
    // history to look through: claimed attempts, half of them finished
    const claimed = await t.sm.claimSteps({ brokerId: "b", handlers: ["h"], limit: 3000 });
    await t.sm.completeAttempts(
      claimed
        .slice(0, 1500)
        .map((c) => ({ attemptId: c.attempt_id, status: "complete" as const, output: {} })),
    );
    const [never] = await t.sql<{ analyzed: boolean }>(
      "select last_analyze is not null or last_autoanalyze is not null as analyzed from pg_stat_user_tables where relid = 'steps'::regclass",
    );
    assert.equal(never?.analyzed, false, "the test needs a steps table without statistics");
  });

  it("claims by walking the ready index in order, never reading and sorting the whole queue", async function () {
    await loadAutoExplain(client, this);
    const notices: string[] = [];
    const onNotice = (n: { message?: string }): void => void notices.push(n.message ?? "");
    client.on("notice", onNotice);
    try {
      await client.query("begin");
      await client.query(
        "set local auto_explain.log_min_duration = 0; set local auto_explain.log_nested_statements = on; set local client_min_messages = log",
      );
      const claimed = await client.query(loadQueries().claim_steps.text, [
        "b",
        ["h"],
        64,
        null,
        "pool",
        null,
      ]);
      assert.equal(claimed.rowCount, 64);
    } finally {
      await client.query("rollback");
      client.off("notice", onNotice);
    }
    const plans = notices.filter((n) => n.includes("plan:")).join("\n---\n");
    assert.match(plans, /Index Scan using steps_ready/, plans);
    assert.doesNotMatch(plans, /Bitmap Index Scan on steps_ready|Seq Scan on steps\b/, plans);
  });

  it("reaches each claimed step's task by key once its plans are the session's generic ones", async function () {
    await loadAutoExplain(client, this);
    const notices: string[] = [];
    const onNotice = (n: { message?: string }): void => void notices.push(n.message ?? "");
    try {
      await client.query("begin");
      await client.query(
        "set local auto_explain.log_min_duration = 0; set local auto_explain.log_nested_statements = on; set local auto_explain.log_format = json",
      );
      // plpgsql plans a statement for its first calls' values, then (from the sixth) once for any:
      // the generic plan guesses 10 rows a side, and a join of claimed steps to their tasks was
      // then a nested loop comparing every step with every task (quadratic in the claim's size)
      for (let call = 1; call <= 8; call++) {
        if (call === 8) {
          await client.query("set local client_min_messages = log");
          client.on("notice", onNotice);
        }
        const claimed = await client.query(loadQueries().claim_steps.text, [
          "b",
          ["h"],
          40,
          null,
          "pool",
          null,
        ]);
        assert.equal(claimed.rowCount, 40, `call ${call}`);
      }
    } finally {
      await client.query("rollback");
      client.off("notice", onNotice);
    }
    // JSON plans: their nodes apart from the query text (whose comments name what they avoid)
    const nodes: PlanNode[] = [];
    const walk = (n: PlanNode): void => {
      nodes.push(n);
      for (const c of n.Plans ?? []) walk(c);
    };
    for (const n of notices) {
      const at = n.indexOf("{", n.indexOf("plan:"));
      if (n.includes("plan:") && at >= 0) walk((JSON.parse(n.slice(at)) as { Plan: PlanNode }).Plan);
    }
    const shown = JSON.stringify(nodes.map((n) => [n["Node Type"], n["Relation Name"], n["Index Name"]]));
    assert.ok(
      nodes.some((n) => n["Node Type"] === "Index Scan" && n["Index Name"] === "tasks_pkey"),
      shown,
    );
    const whole = nodes.filter(
      (n) =>
        n["Join Filter"] !== undefined ||
        n["Node Type"] === "Hash Join" ||
        (n["Node Type"] === "Seq Scan" && ["steps", "tasks"].includes(n["Relation Name"] ?? "")),
    );
    assert.deepEqual(whole, [], shown);
  });
});

describe("completion plans made while a new schema's tables are small", function () {
  this.timeout(60_000);
  const t = useStateManager("plans_small");

  it("stores a parent's result and claims its children by key, never reading steps or tasks whole", async function () {
    const admin = adminDatabaseUrl();
    if (admin === undefined) {
      console.warn("      (skipped: this database role may not load auto_explain, which shows the plans)");
      this.skip();
    }
    await t.sm.registerTemplate(DIAMOND);
    // A few dozen rows, as in the first seconds of a new deployment: the plans complete_results
    // keeps for the connection are made on this first call.
    await t.sm.createTasks(
      Array.from({ length: 20 }, (_, n) => ({ namespace: "p", name: "diamond", context: { n } })),
    );
    const roots = (await t.sql<{ id: string }>("select id from steps where name = 'a' order by id")).map(
      (r) => r.id,
    );
    const own = new pg.Client(connectionConfig(admin, t.schema));
    await own.connect();
    const notices: string[] = [];
    // only the plans of complete_results' statements (the claim before it is another function's)
    own.on("notice", (n: { message?: string; where?: string }) => {
      if (`${n.message ?? ""}\n${n.where ?? ""}`.includes("complete_results")) notices.push(n.message ?? "");
    });
    try {
      await own.query("load 'auto_explain'");
      await own.query(
        "set auto_explain.log_min_duration = 0; set auto_explain.log_nested_statements = on; set client_min_messages = log",
      );
      const q = loadQueries();
      const claimed = await own.query<{ attempt_id: string }>(q.claim_steps.text, [
        "b",
        ["h"],
        1,
        roots.slice(0, 1),
        "pool",
        null,
      ]);
      assert.equal(claimed.rowCount, 1);
      const stored = await own.query<{ kind: string }>(q.complete_attempts.text, [
        JSON.stringify([{ attempt_id: claimed.rows[0]!.attempt_id, status: "complete", output: { a: 1 } }]),
        "b",
        "pool",
        ["h"],
        5,
      ]);
      assert.deepEqual(stored.rows.map((r) => r.kind).sort(), ["claimed", "claimed", "stored"]);
    } finally {
      await own.end();
    }
    const plans = notices.filter((n) => n.includes("plan:")).join("\n---\n");
    assert.match(plans, /complete_results/, "auto_explain showed the statements inside complete_results");
    assert.doesNotMatch(plans, /Seq Scan on (steps|tasks)\b/, plans);
    // the batch's leases are found by key, never by reading every leased step (the partial index
    // whole, by a bitmap or by a walk with no condition), nor by comparing rows in a Join Filter
    assert.doesNotMatch(plans, /Join Filter|Recheck Cond: \(lease_attempt_id IS NOT NULL\)/, plans);
    assert.doesNotMatch(
      plans,
      /Index (Only )?Scan using steps_leased_attempt on \w+ \w+ +\([^)]*\)\n(?! +Index Cond)/,
      plans,
    );
    // the claimed children's STEP fields: their parents and their own children by key, never a
    // whole index walked (what a hash of steps or step_edges looks like with sequential scans off)
    assert.doesNotMatch(
      plans,
      /Index (Only )?Scan using (steps_pkey|step_edges_pkey|step_edges_child) on \w+ \w+ +\([^)]*\)\n(?! +Index Cond)/,
      plans,
    );
  });
});
