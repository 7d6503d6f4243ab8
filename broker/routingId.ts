/**
 * The broker binds one ROUTER per role (see config.ts planListeners); a peer's
 * identity inside the broker is its routing id prefixed with one byte, the
 * index of the listener it came in on. The prefix keeps peers of different
 * sockets apart (two sockets may each have a peer "p1") and lets the outbox
 * pick the socket to send on, so the verbs keep passing one Buffer around.
 */

/** The identity the broker uses for routing id `rid` received on listener `index`. */
export function tagIdentity(index: number, rid: Buffer): Buffer {
  const out = Buffer.allocUnsafe(rid.length + 1);
  out[0] = index;
  rid.copy(out, 1);
  return out;
}

/** The listener a tagged identity came in on. */
export function listenerIndexOf(identity: Buffer): number {
  return identity[0] ?? 0;
}

/** The peer's own ZeroMQ routing id (what a pool set as its routingId), without the listener tag. */
export function routingIdOf(identity: Buffer): Buffer {
  return identity.subarray(1);
}
