/**
 * Journal inspection: stats, inspect (filtered event listing), tail (last events, --follow for a
 * serving store), verify (of the journal alone when damage keeps the store from opening).
 * Inspection folds the journal with the same reducer as recovery, so each event is shown with the
 * volume its layer belonged to at that moment.
 */
import { join, resolve } from 'node:path';
import { Journal, type JournalStats } from '@cowstack/journal';
import { eventTypeNames, type StoreEvent, StoreError, type StoreJournalReport, verifyStoreJournal } from '@cowstack/core';
import { type Command, InvalidArgumentError } from 'commander';
import { example, intArg, ProblemsFound } from '../command-helpers.js';
import { ControlError } from '../control.js';
import type { EventLine } from '../operations.js';
import { Output } from '../output.js';
import { formatSize } from '../sizes.js';
import { runOnStore } from '../store-access.js';

/**
 * Verify a store's journal. A journal damaged after the last checkpoint stops the store from opening
 * (recovery replays through the damage); verify then walks the journal alone, so every damaged
 * record is still named by its seq.
 */
async function verifyJournal(dir: string): Promise<StoreJournalReport> {
  try {
    return (await runOnStore(dir, 'journal.verify', {})).result as StoreJournalReport;
  } catch (err) {
    if (!(err instanceof StoreError) || err.code !== 'ECORRUPT') throw err;
    const journal = await Journal.open<StoreEvent>(join(dir, 'journal'));
    try {
      return await verifyStoreJournal(journal);
    } finally {
      await journal.close();
    }
  }
}

function eventText(e: EventLine): string {
  const where = e.volume !== null ? `${e.volume}${e.layer !== null ? `/L${e.layer}` : ''}` : e.layer !== null ? `L${e.layer}` : '-';
  const range = e.offset !== null && e.length !== null ? `off ${e.offset} len ${e.length}` : e.length !== null ? `size ${e.length}` : '';
  return [String(e.seq).padStart(8), e.time, e.type.padEnd(15), where.padEnd(16), range.padEnd(28), `crc ${e.crc}`, e.detail].join('  ').trimEnd();
}

/** An event type name, in any case; an unknown one is a usage error rather than an empty listing. */
function eventTypeArg(value: string): string {
  const name = eventTypeNames.find((n) => n.toLowerCase() === value.toLowerCase());
  if (name === undefined) throw new InvalidArgumentError(`${JSON.stringify(value)} is not an event type (one of ${eventTypeNames.join(', ')})`);
  return name;
}

function streamTo(out: Output): (item: unknown) => void {
  return (item) => out.line(item, eventText(item as EventLine));
}

export function registerJournalCommands(root: Command): void {
  const journal = example(
    root.command('journal').description('inspect the event journal'),
    'cowstack journal stats /srv/cow',
    'cowstack journal inspect /srv/cow --type Write --json',
  );

  example(
    journal
      .command('stats')
      .description('records, seq range, bytes on disk, checkpoints, retention window, events by type')
      .argument('<store>', 'store directory')
      .option('--json', 'print as JSON')
      .action(async (dir: string, opts: { json?: boolean }) => {
        const out = new Output(opts.json === true);
        const { result } = await runOnStore(resolve(dir), 'journal.stats', {});
        const s = result as JournalStats & { eventsByType: Record<string, number>; retainedPayloadBytes: number; payloadsRetainedFromSeq: number; payloadsRetainedFromTime: string | null; retentionDescription: string };
        out.result(s, () =>
          [
            `journal of ${resolve(dir)}`,
            `  records          ${s.records} (seq ${s.firstSeq}..${s.lastSeq})`,
            `  on disk          ${formatSize(s.diskBytes)}${s.spareBytes > 0 ? ` (${formatSize(s.spareBytes)} of it spare payload segments, kept for reuse)` : ''}`,
            `  checkpoints      ${s.checkpointSeqs.length > 0 ? s.checkpointSeqs.map((c) => `seq ${c}`).join(', ') : 'none'}`,
            `  write payloads   kept from seq ${s.payloadsRetainedFromSeq}${s.payloadsRetainedFromTime ? ` (${s.payloadsRetainedFromTime})` : ''}, ${formatSize(s.retainedPayloadBytes)}: time travel reaches back that far`,
            `  retention        ${s.retentionDescription}`,
            `  events by type   ${Object.entries(s.eventsByType)
              .map(([t, n]) => `${t} ${n}`)
              .join(', ')}`,
          ].join('\n'),
        );
      }),
    'cowstack journal stats /srv/cow',
  );

  example(
    journal
      .command('inspect')
      .description('one line per event: seq, time, type, volume/layer, offset, length, CRC (--json: JSON lines)')
      .argument('<store>', 'store directory')
      .option('--from <seq>', 'first seq', intArg)
      .option('--to <seq>', 'last seq', intArg)
      .option('--volume <name>', 'only events of this volume')
      .option('--type <type>', 'only events of this type (Write, Zero, Frozen, Cloned, ...)', eventTypeArg)
      .option('--json', 'JSON lines')
      .action(async (dir: string, opts: { from?: number; to?: number; volume?: string; type?: string; json?: boolean }) => {
        const out = new Output(opts.json === true);
        await runOnStore(resolve(dir), 'journal.inspect', { from: opts.from, to: opts.to, volume: opts.volume, type: opts.type }, { item: streamTo(out) });
      }),
    'cowstack journal inspect /srv/cow --volume vm1 --type Write --from 1000',
  );

  example(
    journal
      .command('tail')
      .description('the last events; --follow keeps printing events as a serving store commits them')
      .argument('<store>', 'store directory')
      .option('-n, --lines <n>', 'how many events', intArg, 10)
      .option('-f, --follow', 'keep following (needs a running cowstack serve)')
      .option('--json', 'JSON lines')
      .action(async (dir: string, opts: { lines: number; follow?: boolean; json?: boolean }) => {
        const out = new Output(opts.json === true);
        const abort = new AbortController();
        const stop = (): void => abort.abort();
        process.once('SIGINT', stop);
        process.once('SIGTERM', stop);
        try {
          const { via } = await runOnStore(resolve(dir), 'journal.tail', { lines: opts.lines, follow: opts.follow === true }, { item: streamTo(out), signal: abort.signal });
          if (opts.follow && via === 'local') out.note('cowstack: the store is not being served, so no new events can arrive; not following');
        } catch (err) {
          // The server stopping ends a follow the way SIGINT does: there will be no more events.
          if (!(opts.follow && err instanceof ControlError && err.code === 'ESHUTDOWN')) throw err;
          out.note(`cowstack: ${err.message}; no more events to follow`);
        } finally {
          process.off('SIGINT', stop);
          process.off('SIGTERM', stop);
        }
      }),
    'cowstack journal tail /srv/cow --follow',
  );

  example(
    journal
      .command('verify')
      .description('walk the whole journal: chained CRCs, gaps, payload CRCs, checkpoints; exit 1 on damage (a gap recover --force accepted as a loss is shown, marked, and does not count)')
      .argument('<store>', 'store directory')
      .option('--json', 'print as JSON')
      .action(async (dir: string, opts: { json?: boolean }) => {
        const out = new Output(opts.json === true);
        const r = await verifyJournal(resolve(dir));
        out.result(r, () =>
          [
            r.ok ? `journal ok: ${r.recordsChecked} records (seq ${r.firstSeq}..${r.lastSeq}), ${r.payloadsChecked} payloads verified` : `journal damaged:`,
            ...r.problems.map((p) => `  seq ${p.seq}: ${p.message}${p.accepted !== undefined ? ` (an accepted loss, recorded by recover --force at ${new Date(p.accepted.recordedMs).toISOString()})` : ''}`),
          ].join('\n'),
        );
        if (!r.ok) throw new ProblemsFound();
      }),
    'cowstack journal verify /srv/cow',
  );
}
