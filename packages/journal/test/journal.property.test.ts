/**
 * Model-based property test: any interleaving of appends (sync or not, grouped into one turn or
 * not), replays, checkpoints, retention and reopen yields exactly the appended records in order.
 * The model is a plain array of what was appended.
 */
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { Journal } from '../src/index.js';
import { replayAll, tempDir } from './helpers.js';
import { payloadSpareSegments } from '../src/limits.js';

type Meta = unknown;
interface ModelRecord {
  seq: number;
  meta: Meta;
  payload: Buffer | undefined;
  payloadLength: number;
}

const metaArb: fc.Arbitrary<Meta> = fc.oneof(
  fc.integer(),
  fc.string({ maxLength: 20 }),
  fc.boolean(),
  fc.constant(null),
  fc.array(fc.integer({ min: -1e9, max: 1e9 }), { maxLength: 6 }),
  fc.dictionary(fc.stringMatching(/^[a-z]{1,5}$/), fc.integer(), { maxKeys: 4, noNullPrototype: true }),
);

const appendArb = fc.record({
  meta: metaArb,
  payload: fc.option(fc.uint8Array({ minLength: 1, maxLength: 300 }), { nil: undefined }),
  sync: fc.boolean(),
});

const actionArb = fc.oneof(
  { weight: 6, arbitrary: fc.record({ kind: fc.constant('append' as const), items: fc.array(appendArb, { minLength: 1, maxLength: 8 }) }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('replay' as const), from: fc.nat(60), span: fc.nat(60) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('checkpoint' as const), blob: fc.uint8Array({ maxLength: 64 }) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('dropPayloads' as const), back: fc.nat(20) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('dropRecords' as const), back: fc.nat(20) }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('reopen' as const) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('sync' as const) }) },
);

function expectSame(actual: Awaited<ReturnType<typeof replayAll>>, expected: ModelRecord[]): void {
  assert.equal(
    actual.map((r) => [r.seq, r.meta, r.payloadLength, r.payload === undefined ? undefined : Buffer.from(r.payload).toString('hex')]),
    expected.map((r) => [r.seq, r.meta, r.payloadLength, r.payload === undefined ? undefined : r.payload.toString('hex')]),
  );
}

test('any interleaving of journal operations replays exactly the appended records', async () => {
  await fc.assert(
    fc.asyncProperty(fc.array(actionArb, { minLength: 1, maxLength: 25 }), async (actions) => {
      const dir = tempDir('prop');
      // Segments of 600 bytes: a few batches fill one, so segment changes, spares and their reuse
      // happen within a run.
      let journal = await Journal.open(dir, { create: true, payloadSegmentBytes: 600 });
      const model: ModelRecord[] = [];
      const groupStarts = new Set<number>([1]);
      let firstSeq = 1;
      let checkpoint: { seq: number; blob: string } | undefined;
      try {
        for (const action of actions) {
          const lastSeq = model.length === 0 ? firstSeq - 1 : model[model.length - 1].seq;
          switch (action.kind) {
            case 'append': {
              const seqs = await Promise.all(
                action.items.map((item) => journal.append(item.meta, { payload: item.payload && Buffer.from(item.payload), sync: item.sync })),
              );
              assert.equal(seqs, action.items.map((_, i) => lastSeq + 1 + i));
              action.items.forEach((item, i) =>
                model.push({ seq: lastSeq + 1 + i, meta: item.meta, payload: item.payload && Buffer.from(item.payload), payloadLength: item.payload?.length ?? 0 }),
              );
              groupStarts.add(lastSeq + 1 + action.items.length);
              break;
            }
            case 'replay': {
              const from = firstSeq + action.from;
              const to = from + action.span;
              expectSame(await replayAll(journal, from, to), model.filter((r) => r.seq >= from && r.seq <= to));
              break;
            }
            case 'checkpoint':
              if (lastSeq >= 1) {
                await journal.putCheckpoint(lastSeq, action.blob);
                checkpoint = { seq: lastSeq, blob: Buffer.from(action.blob).toString('hex') };
              }
              break;
            case 'dropPayloads': {
              const through = lastSeq - action.back;
              await journal.dropPayloads(through);
              for (const r of model) if (r.seq <= through) r.payload = undefined;
              break;
            }
            case 'dropRecords': {
              const through = lastSeq - action.back;
              const first = await journal.dropRecords(through);
              assert.ok(first <= Math.max(firstSeq, through + 1), `first retained seq ${first} is at most ${through + 1}`);
              assert.ok(first >= firstSeq);
              assert.ok(groupStarts.has(first), `first retained seq ${first} starts a batch`);
              firstSeq = first;
              while (model.length > 0 && model[0].seq < first) model.shift();
              for (const r of model) if (r.seq < first) r.payload = undefined;
              break;
            }
            case 'reopen':
              await journal.close();
              journal = await Journal.open(dir, { payloadSegmentBytes: 600 });
              break;
            case 'sync':
              await journal.sync();
              break;
          }
          assert.is(journal.lastSeq, model.length === 0 ? firstSeq - 1 : model[model.length - 1].seq);
        }
        expectSame(await replayAll(journal), model);
        const report = await journal.verify();
        assert.ok(report.ok, JSON.stringify(report.problems));
        const spares = readdirSync(join(dir, 'payloads')).filter((name) => name.endsWith('.spare'));
        assert.ok(spares.length <= payloadSpareSegments, `${spares.length} spare segments kept`);
        const latest = await journal.latestCheckpoint();
        if (checkpoint) {
          assert.is(latest?.seq, checkpoint.seq);
          assert.is(latest?.blob.toString('hex'), checkpoint.blob);
        } else {
          assert.is(latest, undefined);
        }
      } finally {
        await journal.close();
      }
    }),
    { numRuns: Number(process.env.COWSTACK_PROPERTY_RUNS ?? 60) },
  );
});

test.run();
