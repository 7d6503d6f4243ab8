/**
 * Roles over real TCP on 127.0.0.1 with CURVE: the socket a key is admitted
 * to decides what it may send. Pool keys get in on the pool socket only,
 * client keys on the client socket only; a command outside the socket's role
 * is answered `forbidden`; POOLS names pools to admins only; allow-lists are
 * refused when empty, replaced on reload, and every refused handshake is
 * logged once per peer address (or socket and reason) per interval.
 *
 * One CURVE broker at a time: libzmq has one ZAP endpoint per process.
 */
import { strict as assert } from "node:assert";
import { randomUUID } from "node:crypto";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { pino } from "pino";
import { Dealer, curveKeyPair } from "zeromq";
import { reloadAllowLists } from "../../broker/allowList";
import { Broker } from "../../broker/Broker";
import type { BrokerOptions } from "../../broker/config";
import { RefusalLog } from "../../broker/transport/RefusalLog";
import { HandlerPool } from "../../handlers-node";
import { StepbrokerClient } from "../../handlers-node/client";
import { MAX_CONSECUTIVE_ERRORS } from "../../protocol";
import { RawPeer, type PeerCurve } from "../support/rawPeer";
import { eventually, silent, useBrokerStack } from "../support/stack";

type LogLine = { level: number; msg: string; [k: string]: unknown };

const ECHO = { namespace: "roles", name: "echo", version: "1", steps: [{ name: "only", handler: "echo" }] };
const HELLO = {
  handlers: ["h"],
  capacity: 1,
  sdk: { language: "node" as const, name: "raw-test-peer", version: "0" },
};
/** Long enough that a refused handshake surely happened on a loaded machine, short enough to keep the file quick. */
const REFUSED_WITHIN_MS = 1500;

describe("roles: one socket per role, CURVE keys admitted per socket (tcp://127.0.0.1)", function () {
  this.timeout(60_000);
  const stack = useBrokerStack("roles", "tcp");
  const server = curveKeyPair();
  const poolKey = curveKeyPair();
  const clientKey = curveKeyPair();
  const adminKey = curveKeyPair();
  const strangerKey = curveKeyPair();
  const logs: LogLine[] = [];
  const logger = pino(
    { level: "info" },
    { write: (line: string) => void logs.push(JSON.parse(line) as LogLine) },
  );
  const cleanups: (() => unknown)[] = [];
  let broker: Broker | undefined;

  before(async () => {
    await stack.registerTemplate(ECHO);
  });

  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c();
    await broker?.stop({ drainMs: 0 });
    broker = undefined;
    logs.length = 0;
  });

  const curveOf = (pair: { publicKey: string; secretKey: string }): PeerCurve => ({
    serverPublicKey: server.publicKey,
    ...pair,
  });

  async function startCurveBroker(more: Partial<BrokerOptions> = {}): Promise<Broker> {
    broker = await stack.startBroker({
      brokerId: `roles-${randomUUID()}`,
      endpoints: ["tcp://127.0.0.1:*"],
      clientEndpoints: ["tcp://127.0.0.1:*"],
      logger,
      curve: {
        ...server,
        poolKeys: [poolKey.publicKey],
        clientKeys: [clientKey.publicKey],
      },
      ...more,
    });
    return broker;
  }

  /** The bound endpoints in socket order: pool, client, admin. */
  function endpointsOf(b: Broker): { pool: string; client: string; admin?: string } {
    const [pool, client, admin] = b.endpoints;
    return { pool: pool!, client: client!, ...(admin ? { admin } : {}) };
  }

  function peer(endpoint: string, pair: { publicKey: string; secretKey: string }, id?: string): RawPeer {
    const p = RawPeer.connect(endpoint, id ?? `raw-${randomUUID().slice(0, 8)}`, curveOf(pair));
    cleanups.push(() => p.close());
    return p;
  }

  async function assertNoAnswer(p: RawPeer, what: string): Promise<void> {
    await assert.rejects(p.next(undefined, REFUSED_WITHIN_MS), /no answer within/, what);
  }

  async function goodPoolAndClient(b: Broker): Promise<void> {
    const ep = endpointsOf(b);
    const pool = new HandlerPool({
      endpoint: ep.pool,
      poolId: `good-${randomUUID().slice(0, 8)}`,
      logger: silent,
      curve: curveOf(poolKey),
    });
    pool.handle("echo", (step) => ({ echoed: step.context }));
    await pool.start();
    cleanups.push(() => pool.close({ drainMs: 500 }));
    const client = new StepbrokerClient({ endpoint: ep.client, curve: curveOf(clientKey) });
    cleanups.push(() => client.close());
    const out = await client.submit({ namespace: "roles", name: "echo" }, { n: 1 });
    const done = await client.wait(out.task.task_id, 15_000);
    assert.equal(done.task.state, "complete", "a well-behaved pool and client still get a task done");
  }

  it("refuses a pool key at the client socket's handshake and a client key at the pool socket's, and logs both", async () => {
    const b = await startCurveBroker();
    const ep = endpointsOf(b);
    const poolOnClient = peer(ep.client, poolKey);
    await poolOnClient.probe();
    await assertNoAnswer(poolOnClient, "a pool key gets no answer on the client socket");
    const clientOnPool = peer(ep.pool, clientKey);
    await clientOnPool.send("HELLO", { pool_id: clientOnPool.id, ...HELLO });
    await assertNoAnswer(clientOnPool, "a client key gets no WELCOME on the pool socket");
    assert.ok(!b.listPools().some((p) => p.pool_id === clientOnPool.id), "and is not registered");
    for (const [key, domain] of [
      [poolKey.publicKey, "client"],
      [clientKey.publicKey, "pool"],
    ] as const) {
      assert.ok(
        logs.some((l) => l.client_key === key && l.zap_domain === domain && /not on the/.test(l.msg)),
        `the refusal of ${key} on the ${domain} socket is logged: ${JSON.stringify(logs.map((l) => l.msg))}`,
      );
    }
    // The same keys on their own sockets get in.
    const pool = peer(ep.pool, poolKey);
    await pool.hello(["h"]);
    const client = peer(ep.client, clientKey);
    const rid = await client.probe();
    assert.equal((await client.next("REPLY")).body.request_id, rid);
    await goodPoolAndClient(b);
  });

  it("answers SUBMIT on the pool socket and HELLO on the client socket with forbidden, as strikes", async () => {
    const b = await startCurveBroker();
    const ep = endpointsOf(b);
    const pool = peer(ep.pool, poolKey);
    const requestId = randomUUID();
    await pool.send("SUBMIT", {
      request_id: requestId,
      template: { namespace: "roles", name: "echo" },
      context: {},
    });
    const refused = await pool.next("ERROR");
    assert.equal(refused.body.code, "forbidden");
    assert.equal(refused.body.request_id, requestId, "the client can match the refusal to its request");
    assert.match(String(refused.body.message), /SUBMIT is not allowed on the pool socket/);
    const client = peer(ep.client, clientKey);
    await client.send("HELLO", { pool_id: client.id, ...HELLO });
    assert.equal((await client.next("ERROR")).body.code, "forbidden");
    assert.ok(!b.listPools().some((p) => p.pool_id === client.id), "a client cannot register as a pool");
    assert.ok(
      logs.some((l) => l.code === "forbidden" && l.command === "HELLO"),
      "the refusal is logged with its command",
    );
    // Each forbidden command is a strike: enough in a row and the peer is dropped.
    for (let i = 1; i < MAX_CONSECUTIVE_ERRORS; i++) await client.send("HEARTBEAT", {});
    for (let i = 1; i < MAX_CONSECUTIVE_ERRORS; i++)
      assert.equal((await client.next("ERROR")).body.code, "forbidden");
    assert.equal((await client.next("DISCONNECT")).body.code, "too_many_errors");
    await goodPoolAndClient(b);
  });

  it("shows pool ids in POOLS to the admin socket only", async () => {
    const b = await startCurveBroker({
      adminEndpoints: ["tcp://127.0.0.1:*"],
      curve: {
        ...server,
        poolKeys: [poolKey.publicKey],
        clientKeys: [clientKey.publicKey],
        adminKeys: [adminKey.publicKey],
      },
    });
    const ep = endpointsOf(b);
    const pool = peer(ep.pool, poolKey, "visible-pool");
    await pool.hello(["h"], { heartbeatMs: 100 });
    const client = peer(ep.client, clientKey);
    await client.probe();
    const seen = (await client.next("REPLY")).body.pools as Record<string, unknown>[];
    assert.equal(seen.length, 1, "a client sees that a pool serves h");
    assert.equal(seen[0]!.pool_id, undefined, "but not its id");
    assert.deepEqual(seen[0]!.handlers, ["h"]);
    const admin = peer(ep.admin!, adminKey);
    await admin.probe();
    const full = (await admin.next("REPLY")).body.pools as Record<string, unknown>[];
    assert.deepEqual(
      full.map((p) => p.pool_id),
      ["visible-pool"],
    );
    // The admin key is on no other list, and a client key is not an admin's.
    const clientOnAdmin = peer(ep.admin!, clientKey);
    await clientOnAdmin.probe();
    await assertNoAnswer(clientOnAdmin, "a client key gets no answer on the admin socket");
  });

  it("refuses to start with an empty allow-list, or a key list for a socket it does not bind", () => {
    const base = { endpoints: ["tcp://127.0.0.1:*"], state: stack.sm, logger: silent };
    assert.throws(
      () => new Broker({ ...base, curve: { ...server } }),
      /allow-list of the pool socket .* is empty: give --pool-keys FILE .* or --allow-any-key/,
    );
    assert.throws(
      () =>
        new Broker({
          ...base,
          clientEndpoints: ["tcp://127.0.0.1:*"],
          curve: { ...server, poolKeys: [poolKey.publicKey], clientKeys: [] },
        }),
      /allow-list of the client socket/,
    );
    assert.throws(
      () =>
        new Broker({
          ...base,
          curve: { ...server, poolKeys: [poolKey.publicKey], clientKeys: [clientKey.publicKey] },
        }),
      /--client-keys needs --client-endpoint/,
    );
    assert.throws(
      () =>
        new Broker({
          endpoints: ["ipc:///tmp/sb-roles-none"],
          requireCurve: true,
          state: stack.sm,
          logger: silent,
        }),
      /CURVE is required \(--require-curve\)/,
    );
  });

  it("admits any key with allowAnyKey (--allow-any-key), but still only over CURVE", async () => {
    const b = await startCurveBroker({ curve: { ...server, allowAnyKey: true }, clientEndpoints: [] });
    const ep = endpointsOf(b);
    const stranger = peer(ep.pool, strangerKey);
    await stranger.hello(["h"]);
    const plain = RawPeer.connect(ep.pool);
    cleanups.push(() => plain.close());
    await plain.probe();
    await assertNoAnswer(plain, "a peer without CURVE gets no answer");
  });

  it("replaces an allow-list from its file on reload, and keeps it when the file is broken", async () => {
    const b = await startCurveBroker();
    const ep = endpointsOf(b);
    const file = join(stack.tmp, "pool-keys");
    writeFileSync(file, `# reloaded\n${strangerKey.publicKey}\n`);
    assert.deepEqual(reloadAllowLists(b, { pool: file }, logger), []);
    assert.ok(
      logs.some(
        (l) =>
          l.zap_domain === "pool" &&
          JSON.stringify(l.added) === JSON.stringify([strangerKey.publicKey]) &&
          JSON.stringify(l.removed) === JSON.stringify([poolKey.publicKey]),
      ),
      "the reload logs the keys added and removed",
    );
    const added = peer(ep.pool, strangerKey);
    await added.hello(["h"]);
    const removed = peer(ep.pool, poolKey);
    await removed.send("HELLO", { pool_id: removed.id, ...HELLO });
    await assertNoAnswer(removed, "a removed key no longer gets in");

    writeFileSync(file, `${strangerKey.publicKey}\nnot-a-key\n`);
    assert.deepEqual(reloadAllowLists(b, { pool: file }, logger), ["pool"]);
    assert.ok(
      logs.some((l) =>
        /kept the old pool allow-list: .*pool-keys:2 is not a 40-character Z85 public key/.test(l.msg),
      ),
      "a broken file is logged with the line at fault",
    );
    writeFileSync(file, "# nobody\n");
    assert.deepEqual(reloadAllowLists(b, { pool: file }, logger), ["pool"], "an emptied file is refused too");
    const again = peer(ep.pool, strangerKey);
    await again.hello(["h"]);
  });

  it("logs each kind of refused handshake once per peer address or socket per interval, with the count suppressed", async () => {
    const b = await startCurveBroker({ refusalLogIntervalMs: 60_000 });
    const ep = endpointsOf(b);
    const attempts = 5;
    const raw: Dealer[] = [];
    const wrongServer = curveKeyPair();
    const own = { curvePublicKey: strangerKey.publicKey, curveSecretKey: strangerKey.secretKey };
    for (let i = 0; i < attempts; i++) {
      // An unknown key, no CURVE at all, and a wrong broker public key: each a fresh connection.
      raw.push(
        new Dealer({ linger: 0, curveServerKey: server.publicKey, ...own }),
        new Dealer({ linger: 0 }),
        new Dealer({ linger: 0, curveServerKey: wrongServer.publicKey, ...own }),
      );
    }
    const sockets = raw.map((d) => {
      d.connect(ep.pool);
      return d;
    });
    cleanups.push(() => sockets.forEach((d) => d.close()));
    const refusals = (re: RegExp) => logs.filter((l) => l.level === 40 && re.test(l.msg));
    await eventually("all three kinds of refusal to be logged", () =>
      refusals(/not on the pool allow-list/).length > 0 &&
      refusals(/does not use CURVE/).length > 0 &&
      refusals(/wrong broker public key/).length > 0
        ? true
        : undefined,
    );
    await new Promise((r) => setTimeout(r, REFUSED_WITHIN_MS));
    assert.equal(refusals(/not on the pool allow-list/).length, 1, "one line for the address 127.0.0.1");
    assert.equal(refusals(/does not use CURVE/).length, 1, "one line for peers without CURVE on this socket");
    assert.equal(
      refusals(/wrong broker public key/).length,
      1,
      "one line for a wrong server key on this socket",
    );
    await goodPoolAndClient(b);
  });

  it("logs again after the interval, saying how many lines it suppressed, and remembers a bounded number of peers", async () => {
    const lines: LogLine[] = [];
    const log = pino({ level: "info" }, { write: (l: string) => void lines.push(JSON.parse(l) as LogLine) });
    const r = new RefusalLog(log, 300, 3);
    for (let i = 0; i < 5; i++) r.warn("a", {}, "refused a");
    assert.equal(lines.length, 1);
    await new Promise((res) => setTimeout(res, 350));
    r.warn("a", {}, "refused a");
    assert.equal(lines.length, 2);
    assert.equal(lines[1]!.suppressed, 4);
    assert.match(lines[1]!.msg, /4 more like it suppressed/);
    // A fourth key evicts the stalest: "a" is logged again at once, though inside its interval.
    for (const k of ["b", "c", "d"]) r.warn(k, {}, `refused ${k}`);
    r.warn("a", {}, "refused a");
    assert.equal(lines.length, 6);
  });
});
