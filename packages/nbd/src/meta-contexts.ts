/**
 * Metadata context queries (NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT), pure.
 *
 * The server knows two contexts, `base:allocation` (spec) and `qemu:allocation-depth` (qemu's
 * registered namespace); an export offers those its device lists in `extentContexts`. Query syntax,
 * as the spec and qemu define it:
 * - LIST with no queries returns every context the export offers.
 * - LIST with `base:` or `qemu:` (empty leaf) returns every offered context of that namespace.
 * - An exact name selects that context if offered. SET honours only exact names: `base:` and `qemu:`
 *   select nothing there, as the spec requires.
 * - Anything else (unknown namespace, unknown leaf, no colon) is ignored, never an error.
 * Results come in the server's canonical order without duplicates. Context ids are fixed per name
 * (nonzero, unique) so a BLOCK_STATUS reply can name its context without a per-connection table.
 */
import type { ExtentContext } from '@cowstack/core';

export const knownMetaContexts: readonly ExtentContext[] = ['base:allocation', 'qemu:allocation-depth'];

const contextIds: Readonly<Record<ExtentContext, number>> = { 'base:allocation': 1, 'qemu:allocation-depth': 2 };

export function metaContextId(context: ExtentContext): number {
  return contextIds[context];
}

function namespaceOf(name: string): string {
  const colon = name.indexOf(':');
  return colon < 0 ? '' : name.slice(0, colon + 1);
}

function offered(available: readonly ExtentContext[]): ExtentContext[] {
  return knownMetaContexts.filter((c) => available.includes(c));
}

/** Contexts to report for NBD_OPT_LIST_META_CONTEXT. */
export function listMetaContexts(available: readonly ExtentContext[], queries: readonly string[]): ExtentContext[] {
  const offer = offered(available);
  if (queries.length === 0) return offer;
  return offer.filter((context) => queries.some((q) => q === context || (q === namespaceOf(context) && q.length > 1)));
}

/** Contexts selected by NBD_OPT_SET_META_CONTEXT. */
export function selectMetaContexts(available: readonly ExtentContext[], queries: readonly string[]): ExtentContext[] {
  const offer = offered(available);
  return offer.filter((context) => queries.includes(context));
}
