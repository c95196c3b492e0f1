/**
 * InflightList: entries in start order, removed in any order, each once; the newest match wins.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { InflightList } from '../src/inflight-list.js';

test('keeps start order through removals at the head, middle and tail', () => {
  const list = new InflightList<string>();
  const a = list.add('a');
  const b = list.add('b');
  const c = list.add('c');
  const d = list.add('d');
  assert.equal([...list.values()], ['a', 'b', 'c', 'd']);
  list.remove(b);
  assert.equal([...list.values()], ['a', 'c', 'd']);
  list.remove(a);
  list.remove(d);
  assert.equal([...list.values()], ['c']);
  assert.is(list.size, 1);
  const e = list.add('e');
  assert.equal([...list.values()], ['c', 'e']);
  list.remove(c);
  list.remove(e);
  assert.is(list.size, 0);
  assert.equal([...list.values()], []);
  list.add('f');
  assert.equal([...list.values()], ['f'], 'an emptied list takes entries again');
});

test('findNewest returns the most recently added match', () => {
  const list = new InflightList<{ block: number; id: number }>();
  list.add({ block: 7, id: 1 });
  const second = list.add({ block: 7, id: 2 });
  list.add({ block: 9, id: 3 });
  assert.is(list.findNewest((w) => w.block === 7)?.id, 2);
  list.remove(second);
  assert.is(list.findNewest((w) => w.block === 7)?.id, 1);
  assert.is(list.findNewest((w) => w.block === 8), undefined);
});

test('an entry is removed once', () => {
  const list = new InflightList<number>();
  const entry = list.add(1);
  list.remove(entry);
  assert.throws(() => list.remove(entry), /removed once/);
  assert.is(list.size, 0);
});

test.run();
