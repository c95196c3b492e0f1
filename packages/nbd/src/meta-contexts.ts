/**
 * Metadata context queries (NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT), pure.
 *
 * The server knows `base:allocation` (spec), `qemu:allocation-depth` and `qemu:dirty-bitmap:NAME`
 * (qemu's registered namespace); an export offers those its device lists in `extentContexts`, and a
 * device may also accept exact names it does not list (`acceptsContext`, e.g. a dirty bitmap named by
 * a point in time). Query syntax, as the spec and qemu define it:
 * - LIST with no queries returns every context the export offers.
 * - LIST with `base:` or `qemu:` (empty leaf) returns every offered context of that namespace;
 *   `qemu:dirty-bitmap:` returns every offered dirty bitmap.
 * - An exact name selects that context if offered or accepted. SET honours only exact names: `base:`
 *   and `qemu:` select nothing there, as the spec requires.
 * - Anything else (unknown namespace, unknown leaf, no colon) is ignored, never an error.
 * Results come in the server's canonical order (base, depth, dirty bitmaps) without duplicates.
 * Context ids are numbered per connection (1, 2, ...) in that order.
 */
import type { ExtentContext } from '@cowstack/core';

const dirtyPrefix = 'qemu:dirty-bitmap:';

function known(name: string): name is ExtentContext {
  return name === 'base:allocation' || name === 'qemu:allocation-depth' || (name.startsWith(dirtyPrefix) && name.length > dirtyPrefix.length);
}

function rank(name: ExtentContext): number {
  return name === 'base:allocation' ? 0 : name === 'qemu:allocation-depth' ? 1 : 2;
}

function namespaceOf(name: string): string {
  const colon = name.indexOf(':');
  return colon < 0 ? '' : name.slice(0, colon + 1);
}

function offered(available: readonly ExtentContext[]): ExtentContext[] {
  return [...new Set(available.filter(known))].sort((a, b) => rank(a) - rank(b));
}

/** Contexts to report for NBD_OPT_LIST_META_CONTEXT. */
export function listMetaContexts(available: readonly ExtentContext[], queries: readonly string[], accepts?: (name: string) => boolean): ExtentContext[] {
  const offer = offered(available);
  if (queries.length === 0) return offer;
  const out = offer.filter((context) => queries.some((q) => q === context || (q === namespaceOf(context) && q.length > 1) || (q === dirtyPrefix && context.startsWith(dirtyPrefix))));
  for (const q of queries) if (known(q) && !out.includes(q) && accepts?.(q) === true) out.push(q);
  return out.sort((a, b) => rank(a) - rank(b));
}

/** Contexts selected by NBD_OPT_SET_META_CONTEXT. */
export function selectMetaContexts(available: readonly ExtentContext[], queries: readonly string[], accepts?: (name: string) => boolean): ExtentContext[] {
  const offer = offered(available);
  const out = offer.filter((context) => queries.includes(context));
  for (const q of queries) if (known(q) && !out.includes(q) && accepts?.(q) === true) out.push(q);
  return [...new Set(out)].sort((a, b) => rank(a) - rank(b));
}
