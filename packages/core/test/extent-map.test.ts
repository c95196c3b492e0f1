/** ExtentMap against a flat array: any sequence of sets, clones and reads agrees with the array. */
import fc from 'fast-check';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { ExtentMap } from '../src/index.js';

const size = 5000; // spans several 1024-block chunks

function runsOf(values: number[], first: number, count: number, defaultValue: number): Array<[number, number, number]> {
  const out: Array<[number, number, number]> = [];
  for (let i = first; i < first + count; i++) {
    const v = values[i] ?? defaultValue;
    const last = out[out.length - 1];
    if (last !== undefined && last[2] === v) last[1]++;
    else out.push([i, 1, v]);
  }
  return out;
}

// Mostly small values (a bitmap's 0/1/2, a shallow stack's index); sometimes ones that make a dense
// chunk widen from 1 byte per block to 2 or 4, at the type limits.
const valueArb = fc.oneof({ weight: 12, arbitrary: fc.nat(5) }, { weight: 1, arbitrary: fc.constantFrom(255, 256, 65535, 65536, 2 ** 31 - 1, -1, -(2 ** 31)) });
const opArb = fc.oneof(
  { weight: 6, arbitrary: fc.record({ kind: fc.constant('set' as const), first: fc.nat(size - 1), count: fc.integer({ min: 1, max: 2500 }), value: valueArb }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('point' as const), first: fc.nat(size - 1), value: valueArb }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('clone' as const) }) },
);

test('ExtentMap agrees with a flat array under sets, point writes and shared clones', () => {
  fc.assert(
    fc.property(fc.nat(2), fc.array(opArb, { maxLength: 60 }), fc.nat(size - 1), fc.integer({ min: 1, max: size }), (defaultValue, ops, readFirst, readCount) => {
      let map = new ExtentMap(defaultValue);
      let model: number[] = new Array(size).fill(defaultValue);
      const clones: Array<{ map: ExtentMap; model: number[] }> = [];
      for (const op of ops) {
        if (op.kind === 'clone') {
          clones.push({ map, model });
          map = map.cloneShared();
          model = model.slice();
          continue;
        }
        const count = op.kind === 'point' ? 1 : Math.min(op.count, size - op.first);
        map.set(op.first, count, op.value);
        for (let i = op.first; i < op.first + count; i++) model[i] = op.value;
      }
      for (const { map: m, model: expect } of [...clones, { map, model }]) {
        for (let i = 0; i < size; i += 7) assert.is(m.get(i), expect[i]);
        const count = Math.min(readCount, size - readFirst);
        const runs: Array<[number, number, number]> = [];
        m.forEachRun(readFirst, count, (s, n, v) => runs.push([s, n, v]));
        assert.equal(runs, runsOf(expect, readFirst, count, defaultValue));
        const setRuns: number[] = [];
        m.forEachSetRun((s, n, v) => setRuns.push(s, n, v));
        const expected = runsOf(expect, 0, size, defaultValue).filter((r) => r[2] !== defaultValue).flat();
        assert.equal(setRuns, expected);
        assert.equal(ExtentMap.fromRuns(defaultValue, m.toRuns()).toRuns(), m.toRuns());
      }
    }),
    { numRuns: Number(process.env.COWSTACK_PROPERTY_RUNS ?? 300) },
  );
});

test('a fragmented chunk holds small values in 1 byte per block and widens, keeping every value, when a larger one is set', () => {
  const map = new ExtentMap(0);
  for (let b = 0; b < 1024; b += 2) map.set(b, 1, 1 + ((b >> 1) % 3));
  const chunkBytes = (m: ExtentMap): number => m.approximateBytes() - 48;
  assert.is(chunkBytes(map), 1024, 'a dense chunk of values 0..3: one byte per block');
  const before = map.cloneShared();
  map.set(5, 1, 300);
  assert.is(chunkBytes(map), 2048, 'a value over 255: two bytes per block');
  map.set(7, 1, 70000);
  assert.is(chunkBytes(map), 4096, 'a value over 65535: four bytes per block');
  for (let b = 0; b < 1024; b++) {
    const expect = b === 5 ? 300 : b === 7 ? 70000 : b % 2 === 0 ? 1 + ((b >> 1) % 3) : 0;
    assert.is(map.get(b), expect, `block ${b}`);
    assert.is(before.get(b), b % 2 === 0 ? 1 + ((b >> 1) % 3) : 0, `block ${b} of the clone taken before`);
  }
  assert.is(chunkBytes(before), 1024, 'the clone keeps its narrow chunk');
});

test('a huge sparse map costs memory by extents, not by size', () => {
  const map = new ExtentMap(0);
  const tib = 2 ** 40 / 4096;
  for (let i = 0; i < 100; i++) map.set(Math.floor((tib / 100) * i), 1, 1);
  map.set(0, tib, 1);
  assert.ok(map.chunkCount <= tib / 1024, 'a fully set range becomes uniform chunks');
  const sparse = new ExtentMap(0);
  for (let i = 0; i < 100; i++) sparse.set(Math.floor((tib / 100) * i) + 3, 2, 1);
  assert.is(sparse.chunkCount, 100);
  assert.ok(sparse.approximateBytes() < 100 * 200, `${sparse.approximateBytes()} bytes for 100 small extents`);
});

test.run();
