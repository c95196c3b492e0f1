/**
 * InflightList: the operations in flight on a hot path (one add and one remove per request), in
 * the order they started, as a doubly linked list.
 *
 * Why not a Set: a Set that lives long sits in V8's old generation, and one add and one delete per
 * request make it rehash every few dozen requests. Each rehash leaves the old table behind, still
 * pointing at the entries it held, and the young-generation collector takes every old-generation
 * object as live: until the next full collection, the dead tables keep those entries, and the write
 * payloads they reference, alive. Every payload was then promoted with its ArrayBuffer, V8 counted
 * the ArrayBuffers as external memory, and at 4k random writes the pressure started a full
 * collection every 50-100 ms (measured in BENCHMARKS.md). A list allocates one small node per
 * entry and nothing else, and a removed node's links are cleared, so a dead node keeps nothing.
 *
 * Pure code, no I/O.
 */
import { assert } from './errors.js';

/** An entry's place in the list, returned by `add` and given back to `remove`. */
export interface InflightEntry<T> {
  readonly value: T;
}

class Node<T> implements InflightEntry<T> {
  prev: Node<T> | undefined = undefined;
  next: Node<T> | undefined = undefined;
  linked = true;
  constructor(readonly value: T) {}
}

export class InflightList<T> {
  private head: Node<T> | undefined = undefined;
  private tail: Node<T> | undefined = undefined;
  private count = 0;

  get size(): number {
    return this.count;
  }

  /** Appends `value` (the newest entry). */
  add(value: T): InflightEntry<T> {
    const node = new Node(value);
    node.prev = this.tail;
    if (this.tail === undefined) this.head = node;
    else this.tail.next = node;
    this.tail = node;
    this.count++;
    return node;
  }

  /** Removes an entry `add` returned; each entry exactly once. */
  remove(entry: InflightEntry<T>): void {
    const node = entry as Node<T>;
    assert(node.linked, 'an in-flight entry is removed once');
    if (node.prev === undefined) this.head = node.next;
    else node.prev.next = node.next;
    if (node.next === undefined) this.tail = node.prev;
    else node.next.prev = node.prev;
    node.prev = undefined;
    node.next = undefined;
    node.linked = false;
    this.count--;
  }

  /** The values, oldest first. Removing the entry the walk is at ends the walk: to remove while walking, walk a copy (`Array.from`). */
  *values(): IterableIterator<T> {
    for (let node = this.head; node !== undefined; node = node.next) yield node.value;
  }

  /** The first value, newest first, for which `match` holds; undefined when none does. */
  findNewest(match: (value: T) => boolean): T | undefined {
    for (let node = this.tail; node !== undefined; node = node.prev) if (match(node.value)) return node.value;
    return undefined;
  }
}
