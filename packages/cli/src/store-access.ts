/**
 * How a command reaches its store: open it here when it is free, or, when another process holds it,
 * send the operation to that process's control socket. Either way the same operation code runs.
 */
import { Store, StoreError } from '@cowstack/core';
import { callServer } from './control.js';
import { type OperationContext, runOperation } from './operations.js';

export interface AccessHandlers {
  readonly progress?: OperationContext['progress'];
  readonly item?: (item: unknown) => void;
  readonly signal?: AbortSignal;
}

/** Whether the operation ran here (`local`) or in the serving process. */
export interface AccessResult {
  readonly result: unknown;
  readonly via: 'local' | 'server';
}

export async function runOnStore(dir: string, op: string, args: Record<string, unknown>, handlers: AccessHandlers = {}): Promise<AccessResult> {
  let store: Store;
  try {
    store = await Store.open(dir, { onProgress: handlers.progress });
  } catch (err) {
    if (err instanceof StoreError && err.code === 'ELOCKED') {
      const result = await callServer(dir, op, args, handlers);
      return { result, via: 'server' };
    }
    throw err;
  }
  try {
    const result = await runOperation(op, { store, progress: handlers.progress, emit: handlers.item, signal: handlers.signal }, args);
    return { result, via: 'local' };
  } finally {
    await store.close();
  }
}
