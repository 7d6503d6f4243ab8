/**
 * The broker may bind one ROUTER per role (see config.ts planListeners). With
 * more than one, a peer's identity inside the broker is its routing id behind
 * a two-byte tag naming the socket it came in on ("1|" + routing id): it keeps
 * peers of different sockets apart (two sockets may each have a peer "p1")
 * and lets the outbox pick the socket to send on, so the verbs keep passing
 * one Buffer around. The tag has a fixed length, so no routing id can forge
 * another socket's, and it stays readable in logs. With one socket, the
 * default, identities are the routing ids themselves.
 */
export class PeerIdentities {
  constructor(private readonly sockets: number) {
    if (sockets < 1 || sockets > 10) throw new Error(`cannot tag identities for ${sockets} sockets`);
  }

  private get tagged(): boolean {
    return this.sockets > 1;
  }

  /** The identity the broker uses for routing id `rid` received on socket `index`. */
  tag(index: number, rid: Buffer): Buffer {
    if (!this.tagged) return rid;
    const out = Buffer.allocUnsafe(rid.length + 2);
    out[0] = 0x30 + index; // "0".."9"
    out[1] = 0x7c; // "|"
    rid.copy(out, 2);
    return out;
  }

  /** The index of the socket a peer is on. */
  socketOf(identity: Buffer): number {
    return this.tagged ? (identity[0] ?? 0x30) - 0x30 : 0;
  }

  /** The peer's own ZeroMQ routing id (what a pool set as its routingId), without the socket tag. */
  routingIdOf(identity: Buffer): Buffer {
    return this.tagged ? identity.subarray(2) : identity;
  }
}
