/**
 * A ZAP handler (ZeroMQ RFC 27) that admits CURVE clients whose public key is
 * on the allow-list of the ZAP domain they connect to. Without a ZAP handler,
 * CURVE encrypts but admits any client that knows the broker's public key.
 *
 * The broker binds one ROUTER per role (pools, clients, admins), each with its
 * own ZAP domain, so the socket a key is admitted to decides what it may send:
 * zeromq.js cannot tell which key sent a given message on a shared socket.
 *
 * libzmq asks the socket bound at inproc://zeromq.zap.01 in the same context;
 * the request carries the domain and the client's raw 32-byte key, which is
 * Z85-encoded here to compare with keys written as `stepbroker keygen` prints them.
 */
import type { Logger } from "pino";
import { Router } from "zeromq";
import type { RefusalLog } from "./RefusalLog";

export interface ZapHandler {
  /** Replaces a domain's allow-list; returns the keys added and removed. */
  setKeys(domain: string, keys: readonly string[]): { added: string[]; removed: string[] };
  close(): Promise<void>;
}

/** One ZAP domain: its allow-list, or `anyKey` to admit every CURVE key (--allow-any-key). */
export interface ZapDomain {
  keys: readonly string[];
  anyKey: boolean;
}

const ZAP_ENDPOINT = "inproc://zeromq.zap.01";

const Z85 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#";

export function z85Encode(data: Uint8Array): string {
  if (data.length % 4 !== 0) throw new Error("Z85 input length must be a multiple of 4");
  let out = "";
  for (let i = 0; i < data.length; i += 4) {
    let value = ((data[i]! << 24) >>> 0) + (data[i + 1]! << 16) + (data[i + 2]! << 8) + data[i + 3]!;
    const chunk: string[] = [];
    for (let j = 0; j < 5; j++) {
      chunk.unshift(Z85[value % 85]!);
      value = Math.floor(value / 85);
    }
    out += chunk.join("");
  }
  return out;
}

export async function startZapHandler(
  domains: ReadonlyMap<string, ZapDomain>,
  log: Logger,
  refusals: RefusalLog,
): Promise<ZapHandler> {
  const allowed = new Map<string, { keys: Set<string>; anyKey: boolean }>();
  for (const [name, d] of domains) allowed.set(name, { keys: new Set(d.keys), anyKey: d.anyKey });
  // A ROUTER, not a REP: one reader loop answers each request by its envelope.
  const sock = new Router({ linger: 0 });
  await sock.bind(ZAP_ENDPOINT);
  let open = true;
  const loop = (async () => {
    try {
      for await (const frames of sock) {
        // [routing id, empty delimiter, version, request id, domain, address, identity, mechanism, ...credentials]
        const [rid, delim, version, requestId, domainFrame, addressFrame, , mechanism, key] = frames;
        if (!rid || !delim || !version || !requestId) continue;
        const mech = mechanism?.toString() ?? "";
        const domain = domainFrame?.toString() ?? "";
        const address = addressFrame?.toString() ?? "";
        const d = allowed.get(domain);
        let status = "400";
        let text: string;
        let user = "";
        if (!d) {
          text = `unknown ZAP domain ${domain}`;
        } else if (mech !== "CURVE" || !key || key.length !== 32) {
          text = `mechanism ${mech} not allowed`;
        } else {
          const z = z85Encode(key);
          if (d.anyKey || d.keys.has(z)) {
            status = "200";
            text = "OK";
            user = z;
          } else {
            text = "unknown key";
            refusals.warn(
              `zap:${domain}:${address}`,
              { client_key: z, address, zap_domain: domain },
              `refused a CURVE client from ${address} on the ${domain} socket: its key ${z} is not on the ${domain} allow-list; add it to that list file and send SIGHUP, or connect it to the socket of its role`,
            );
          }
        }
        if (status !== "200" && text !== "unknown key")
          refusals.warn(
            `zap:${domain}:${address}`,
            { address, zap_domain: domain, mechanism: mech },
            `refused a client from ${address} on the ${domain} socket: ${text}`,
          );
        await sock.send([rid, delim, version, requestId, status, text, user, ""]);
      }
    } catch (e) {
      if (open) log.error({ err: e }, "ZAP handler stopped");
    }
  })();
  return {
    setKeys(domain, keys) {
      const d = allowed.get(domain);
      if (!d) throw new Error(`no ZAP domain ${domain}`);
      const next = new Set(keys);
      const added = [...next].filter((k) => !d.keys.has(k));
      const removed = [...d.keys].filter((k) => !next.has(k));
      d.keys = next;
      return { added, removed };
    },
    async close() {
      open = false;
      // close() frees the endpoint only when libzmq's reaper gets to it; a broker started
      // right after this one must be able to bind the ZAP endpoint at once.
      await sock.unbind(ZAP_ENDPOINT).catch(() => undefined);
      sock.close();
      await loop;
    },
  };
}
