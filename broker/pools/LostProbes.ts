/**
 * Steps whose attempt was lost at a pool that had never had a result stored
 * (an unproven pool purged, or gone, while it held it). Their retries are
 * kept from other unproven pools while a proven pool serves their handler:
 * otherwise a swarm of pools that take work and never answer could spend
 * every attempt of a step, one probe each, and fail a task that a working
 * pool would have run. Bounded; the oldest are forgotten first.
 */
export class LostProbes {
  /** step id -> its handler, oldest first. */
  private readonly steps = new Map<string, string>();

  constructor(private readonly most = 4096) {}

  remember(stepId: string, handler: string): void {
    this.steps.delete(stepId);
    this.steps.set(stepId, handler);
    if (this.steps.size > this.most) this.steps.delete(this.steps.keys().next().value!);
  }

  forget(stepId: string): void {
    this.steps.delete(stepId);
  }

  get size(): number {
    return this.steps.size;
  }

  /** The remembered steps whose handler is one of `handlers`. */
  of(handlers: ReadonlySet<string>): string[] {
    const out: string[] = [];
    if (handlers.size === 0) return out;
    for (const [stepId, handler] of this.steps) if (handlers.has(handler)) out.push(stepId);
    return out;
  }
}
