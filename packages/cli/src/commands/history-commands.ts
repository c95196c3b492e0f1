/**
 * Time travel and compatibility commands: blame (which event last wrote each extent), retain (how
 * much write history the journal keeps), import-dmcow and table (the 2006 dm-cow format). Like the
 * layer commands they run here or through a serving store's control socket. Point-in-time exports
 * (VOLUME@seq:N, VOLUME@time:ISO) and dirty bitmaps need no command: `cowstack serve` answers them.
 */
import { resolve } from 'node:path';
import type { BlameExtent, DmCowImportReport, DmCowTable, RetentionPolicy } from '@cowstack/core';
import type { Command } from 'commander';
import { example, intArg, retentionArg, sizeArg } from '../command-helpers.js';
import { Output, table } from '../output.js';
import { formatSize } from '../sizes.js';
import { runOnStore } from '../store-access.js';

async function run<T>(dir: string, op: string, args: Record<string, unknown>): Promise<T> {
  return (await runOnStore(resolve(dir), op, args)).result as T;
}

export function registerHistoryCommands(root: Command): void {
  example(
    root
      .command('blame')
      .description('for each extent of a range of a volume: the event that last wrote it (seq, time, client, layer)')
      .argument('<store>', 'store directory')
      .argument('<volume>', 'volume name')
      .argument('<offset>', 'byte offset', intArg)
      .argument('[length]', 'bytes (default 1)', intArg)
      .option('--json', 'print as JSON')
      .action(async (dir: string, volume: string, offset: number, length: number | undefined, opts: { json?: boolean }) => {
        const out = new Output(opts.json === true);
        const extents = await run<BlameExtent[]>(dir, 'blame', { volume, offset, length: length ?? 1 });
        out.result(extents, () =>
          table(extents, [
            { header: 'OFFSET', value: (e) => String(e.offset), align: 'right' },
            { header: 'LENGTH', value: (e) => String(e.length), align: 'right' },
            { header: 'SEQ', value: (e) => (e.seq === null ? '-' : String(e.seq)), align: 'right' },
            { header: 'TIME', value: (e) => e.time ?? '-' },
            { header: 'EVENT', value: (e) => e.type },
            { header: 'LAYER', value: (e) => (e.layerId === null ? '-' : String(e.layerId)), align: 'right' },
            { header: 'CLIENT', value: (e) => e.origin ?? '-' },
          ]),
        );
      }),
    'cowstack blame /srv/cow vm1 1048576 65536',
  );

  example(
    root
      .command('retain')
      .description('show or set how much write history the journal keeps: checkpoint (default), all, 24h, 10G, or seq:N (or just N)')
      .argument('<store>', 'store directory')
      .argument('[policy]', 'checkpoint | all | <N>s|m|h|d | <N>K|M|G|T | seq:<N>', (value: string) => (retentionArg(value), value))
      .option('--json', 'print as JSON')
      .action(async (dir: string, policy: string | undefined, opts: { json?: boolean }) => {
        const out = new Output(opts.json === true);
        const r = await run<{ policy: RetentionPolicy; description: string }>(dir, 'retain', { policy });
        out.result(r, () => `retention of ${resolve(dir)}: ${r.description}${policy !== undefined ? ' (applied at the next checkpoint)' : ''}`);
      }),
    'cowstack retain /srv/cow 24h     # point-in-time exports and snapshot --at reach back 24 hours',
  );

  example(
    root
      .command('import-dmcow')
      .description('import a dm-cow layer (a data device plus a bitmap device with magic 0x00BABE0EAABABE11) as a new volume')
      .argument('<store>', 'store directory')
      .requiredOption('--data <path>', 'the layer\'s data device or image')
      .requiredOption('--bitmap <path>', 'the layer\'s bitmap device or file')
      .requiredOption('--volume <name>', 'name of the new volume')
      .option('--on <snapshot>', 'VOLUME@SNAPSHOT the layer sits on (default: a new zero base)')
      .option('--size <size>', 'volume size (default: the data device\'s size)', sizeArg)
      .option('--json', 'print as JSON')
      .action(async (dir: string, opts: { data: string; bitmap: string; volume: string; on?: string; size?: number; json?: boolean }) => {
        const out = new Output(opts.json === true);
        const r = await run<DmCowImportReport>(dir, 'import-dmcow', {
          name: opts.volume,
          data: resolve(opts.data),
          bitmap: resolve(opts.bitmap),
          below: opts.on,
          sizeBytes: opts.size,
        });
        out.result(r, () =>
          r.magicFound
            ? `imported volume ${r.volume.name} (${formatSize(r.volume.sizeBytes)}): ${r.sectorsImported} sectors from ${resolve(opts.data)}`
            : `imported volume ${r.volume.name} (${formatSize(r.volume.sizeBytes)}): the bitmap was never used (no magic), so the layer is empty`,
        );
      }),
    'cowstack import-dmcow /srv/cow --data /dev/sdb3 --bitmap /dev/sdb2 --on base@golden --volume node17',
  );

  example(
    root
      .command('table')
      .description('print a dm-cow table line for a volume, writing one dm-cow bitmap file per layer into DIR')
      .argument('<store>', 'store directory')
      .argument('<volume>', 'volume name')
      .requiredOption('--bitmaps <dir>', 'directory for the bitmap files')
      .option('--json', 'print as JSON')
      .action(async (dir: string, volume: string, opts: { bitmaps: string; json?: boolean }) => {
        const out = new Output(opts.json === true);
        const r = await run<DmCowTable>(dir, 'table', { volume, bitmaps: resolve(opts.bitmaps) });
        for (const w of r.warnings) out.note(`cowstack: warning: ${w}`);
        out.result(r, () => r.line);
      }),
    'cowstack table /srv/cow vm1 --bitmaps /var/lib/cow-bitmaps',
  );
}
