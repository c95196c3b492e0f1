/**
 * The layer workflow: ls, volume create/delete/ls, snapshot, clone, commit, flatten, import, export,
 * map, diff. Each runs on the store here, or through the control socket of the `cowstack serve`
 * holding it (store-access.ts), and prints a table or, with --json, JSON.
 */
import { resolve } from 'node:path';
import type { DiffExtent, LayerInfo, MapExtent, SnapshotInfo, VolumeInfo } from '@cowstack/core';
import type { Command } from 'commander';
import { example, sizeArg } from '../command-helpers.js';
import { Output, table } from '../output.js';
import { progress } from '../progress.js';
import { formatSize } from '../sizes.js';
import { runOnStore } from '../store-access.js';

interface LsResult {
  store: string;
  blockSizeBytes: number;
  lastSeq: number;
  volumes: VolumeInfo[];
  snapshots: SnapshotInfo[];
  layers: LayerInfo[];
}

/** Run one operation with a progress bar (unless --json) and return its result. */
async function run<T>(dir: string, op: string, args: Record<string, unknown>, json: boolean, withProgress = false): Promise<T> {
  const bar = progress(withProgress && !json);
  try {
    return (await runOnStore(resolve(dir), op, args, { progress: bar.callback })).result as T;
  } finally {
    bar.stop();
  }
}

function tree(ls: LsResult): string {
  const layers = new Map(ls.layers.map((l) => [l.id, l]));
  const lines = [`store ${ls.store}: ${ls.volumes.length} volume(s), ${ls.snapshots.length} snapshot(s), ${ls.layers.length} layer(s), block size ${ls.blockSizeBytes}, journal seq ${ls.lastSeq}`];
  const describe = (l: LayerInfo): string => {
    const what = l.parent === null ? `base (${l.kind}${l.source ? ` ${l.source}` : ''}), ${formatSize(l.sizeBytes)}` : l.frozen ? 'frozen' : 'writable';
    const tags = [...(l.volume ? [`volume ${l.volume}`] : []), ...l.names.map((n) => `snapshot ${n}`)];
    return `layer ${l.id}: ${what}, ${formatSize(l.dataBytes)} data${l.zeroBytes > 0 ? `, ${formatSize(l.zeroBytes)} zeroed` : ''}${tags.length > 0 ? `  <- ${tags.join(', ')}` : ''}`;
  };
  const walk = (l: LayerInfo, prefix: string, last: boolean, root: boolean): void => {
    lines.push(`${prefix}${root ? '' : last ? '└─ ' : '├─ '}${describe(l)}`);
    const kids = l.children.map((c) => layers.get(c)!).filter(Boolean);
    kids.forEach((k, i) => walk(k, root ? prefix : `${prefix}${last ? '   ' : '│  '}`, i === kids.length - 1, false));
  };
  for (const root of ls.layers.filter((l) => l.parent === null)) walk(root, '', true, true);
  return lines.join('\n');
}

const volumeColumns = [
  { header: 'VOLUME', value: (v: VolumeInfo) => v.name },
  { header: 'SIZE', value: (v: VolumeInfo) => formatSize(v.sizeBytes), align: 'right' as const },
  { header: 'LAYERS', value: (v: VolumeInfo) => String(v.stack.length), align: 'right' as const },
  { header: 'TOP', value: (v: VolumeInfo) => String(v.topLayerId), align: 'right' as const },
  { header: 'SNAPSHOTS', value: (v: VolumeInfo) => v.snapshots.join(',') || '-' },
];

export function registerLayerCommands(root: Command): void {
  example(
    root
      .command('ls')
      .description('show the layer tree with volumes, snapshots, sizes and allocated bytes')
      .argument('<store>', 'store directory')
      .option('--json', 'print as JSON')
      .action(async (dir: string, opts: { json?: boolean }) => {
        const out = new Output(opts.json === true);
        const ls = await run<LsResult>(dir, 'ls', {}, out.json);
        out.result(ls, () => tree(ls));
      }),
    'cowstack ls /srv/cow',
  );

  const volume = example(
    root.command('volume').description('create, delete and list volumes'),
    'cowstack volume create /srv/cow scratch --size 50G',
    'cowstack volume ls /srv/cow',
  );
  example(
    volume
      .command('create')
      .description('create a volume on a new empty base')
      .argument('<store>', 'store directory')
      .argument('<name>', 'volume name')
      .requiredOption('--size <size>', 'volume size (e.g. 10G)', sizeArg)
      .option('--json', 'print as JSON')
      .action(async (dir: string, name: string, opts: { size: number; json?: boolean }) => {
        const out = new Output(opts.json === true);
        const info = await run<VolumeInfo>(dir, 'volume.create', { name, sizeBytes: opts.size }, out.json);
        out.result(info, () => `created volume ${info.name} (${formatSize(info.sizeBytes)})`);
      }),
    'cowstack volume create /srv/cow scratch --size 50G',
  );
  example(
    volume
      .command('delete')
      .description('delete a volume (its snapshots stay until deleted)')
      .argument('<store>', 'store directory')
      .argument('<name>', 'volume name')
      .option('--json', 'print as JSON')
      .action(async (dir: string, name: string, opts: { json?: boolean }) => {
        const out = new Output(opts.json === true);
        const result = await run<{ deleted: string }>(dir, 'volume.delete', { name }, out.json);
        out.result(result, () => `deleted volume ${name}`);
      }),
    'cowstack volume delete /srv/cow scratch',
  );
  example(
    volume
      .command('ls')
      .description('list volumes')
      .argument('<store>', 'store directory')
      .option('--json', 'print as JSON')
      .action(async (dir: string, opts: { json?: boolean }) => {
        const out = new Output(opts.json === true);
        const volumes = await run<VolumeInfo[]>(dir, 'volume.ls', {}, out.json);
        out.result(volumes, () => table(volumes, volumeColumns));
      }),
    'cowstack volume ls /srv/cow --json',
  );

  example(
    root
      .command('snapshot')
      .description('freeze a volume\'s top layer as a named, read-only snapshot (exported as VOLUME@NAME); --delete removes one')
      .argument('<store>', 'store directory')
      .argument('<target>', 'VOLUME to snapshot, or VOLUME@SNAPSHOT with --delete')
      .option('--name <name>', 'snapshot name (default snap-N)')
      .option('--delete', 'delete the snapshot VOLUME@SNAPSHOT (its data goes once no clone uses it)')
      .option('--at <point>', 'a retroactive snapshot: the volume as it was at seq:N, time:ISO-8601 or another snapshot (needs that time\'s data in the journal: see `cowstack retain`)')
      .option('--json', 'print as JSON')
      .action(async (dir: string, target: string, opts: { name?: string; delete?: boolean; at?: string; json?: boolean }) => {
        const out = new Output(opts.json === true);
        if (opts.delete) {
          const result = await run<{ deleted: string }>(dir, 'snapshot.delete', { ref: target }, out.json);
          out.result(result, () => `deleted snapshot ${target}`);
          return;
        }
        if (opts.at !== undefined) {
          const snap = await run<SnapshotInfo & { seq: number }>(dir, 'snapshot.at', { volume: target, at: opts.at, name: opts.name }, out.json, true);
          out.result(snap, () => `snapshot ${snap.volume}@${snap.name} (layer ${snap.layerId}): ${snap.volume} as it was at seq ${snap.seq}`);
          return;
        }
        const snap = await run<SnapshotInfo>(dir, 'snapshot', { volume: target, name: opts.name }, out.json);
        out.result(snap, () => `snapshot ${snap.volume}@${snap.name} (layer ${snap.layerId})`);
      }),
    'cowstack snapshot /srv/cow default --name golden',
    'cowstack snapshot /srv/cow default@golden --delete',
    'cowstack snapshot /srv/cow default --at time:2026-11-25T09:00:00Z --name before-upgrade',
  );

  example(
    root
      .command('clone')
      .description('create a volume on top of a snapshot')
      .argument('<store>', 'store directory')
      .argument('<source>', 'VOLUME@SNAPSHOT')
      .argument('<name>', 'new volume name')
      .option('--json', 'print as JSON')
      .action(async (dir: string, source: string, name: string, opts: { json?: boolean }) => {
        const out = new Output(opts.json === true);
        const info = await run<VolumeInfo>(dir, 'clone', { source, name }, out.json);
        out.result(info, () => `created volume ${info.name} from ${source}`);
      }),
    'for i in $(seq 1 10); do cowstack clone /srv/cow default@golden vm$i; done',
  );

  example(
    root
      .command('commit')
      .description('merge a layer into the one below it: VOLUME merges its top; VOLUME@SNAPSHOT merges that snapshot')
      .argument('<store>', 'store directory')
      .argument('<target>', 'VOLUME or VOLUME@SNAPSHOT')
      .option('--json', 'print as JSON')
      .action(async (dir: string, target: string, opts: { json?: boolean }) => {
        const out = new Output(opts.json === true);
        const r = await run<{ layerId: number; parentId: number; bytesCopied: number }>(dir, 'commit', { target }, out.json, true);
        out.result(r, () => `committed layer ${r.layerId} into layer ${r.parentId} (${formatSize(r.bytesCopied)} copied)`);
      }),
    'cowstack commit /srv/cow vm1',
  );

  example(
    root
      .command('flatten')
      .description('make a volume independent of every layer below its top (copies what it reads from them)')
      .argument('<store>', 'store directory')
      .argument('<volume>', 'volume name')
      .option('--json', 'print as JSON')
      .action(async (dir: string, name: string, opts: { json?: boolean }) => {
        const out = new Output(opts.json === true);
        const r = await run<{ bytesCopied: number }>(dir, 'flatten', { volume: name }, out.json, true);
        out.result(r, () => `flattened ${name} (${formatSize(r.bytesCopied)} copied)`);
      }),
    'cowstack flatten /srv/cow vm1',
  );

  example(
    root
      .command('import')
      .description('create a volume from a raw image (copied into the store; zero blocks are not stored)')
      .argument('<store>', 'store directory')
      .argument('<image>', 'raw image file or block device')
      .requiredOption('--volume <name>', 'name of the new volume')
      .option('--json', 'print as JSON')
      .action(async (dir: string, image: string, opts: { volume: string; json?: boolean }) => {
        const out = new Output(opts.json === true);
        const info = await run<VolumeInfo>(dir, 'import', { name: opts.volume, path: resolve(image) }, out.json, true);
        out.result(info, () => `imported ${resolve(image)} as volume ${info.name} (${formatSize(info.sizeBytes)})`);
      }),
    'cowstack import /srv/cow /images/debian-12.raw --volume debian',
  );

  example(
    root
      .command('export')
      .description('write a volume or snapshot to a raw image file (sparse: holes stay holes)')
      .argument('<store>', 'store directory')
      .argument('<source>', 'VOLUME or VOLUME@SNAPSHOT')
      .argument('<file>', 'raw image to write')
      .option('--json', 'print as JSON')
      .action(async (dir: string, source: string, file: string, opts: { json?: boolean }) => {
        const out = new Output(opts.json === true);
        const r = await run<{ sizeBytes: number; dataBytes: number; path: string }>(dir, 'export', { ref: source, path: resolve(file) }, out.json, true);
        out.result(r, () => `exported ${source} to ${r.path} (${formatSize(r.sizeBytes)}, ${formatSize(r.dataBytes)} data)`);
      }),
    'cowstack export /srv/cow default@golden golden.raw',
  );

  example(
    root
      .command('map')
      .description('extents of a volume or snapshot with data/zero/hole and the layer holding each (like qemu-img map)')
      .argument('<store>', 'store directory')
      .argument('<source>', 'VOLUME or VOLUME@SNAPSHOT')
      .option('--json', 'print as JSON (one object per extent)')
      .action(async (dir: string, source: string, opts: { json?: boolean }) => {
        const out = new Output(opts.json === true);
        const extents = await run<MapExtent[]>(dir, 'map', { ref: source }, out.json);
        out.result(extents, () =>
          table(extents, [
            { header: 'OFFSET', value: (e) => `0x${e.offset.toString(16)}`, align: 'right' },
            { header: 'LENGTH', value: (e) => `0x${e.length.toString(16)}`, align: 'right' },
            { header: 'SIZE', value: (e) => formatSize(e.length), align: 'right' },
            { header: 'KIND', value: (e) => e.kind },
            { header: 'LAYER', value: (e) => (e.layerId === null ? '-' : String(e.layerId)), align: 'right' },
            { header: 'DEPTH', value: (e) => String(e.depth), align: 'right' },
          ]),
        );
      }),
    'cowstack map /srv/cow vm1 --json',
  );

  example(
    root
      .command('diff')
      .description('extents that may differ between two volumes or snapshots; or, with --since, the extents of a volume written since a point in its history')
      .argument('<store>', 'store directory')
      .argument('<a>', 'VOLUME or VOLUME@SNAPSHOT')
      .argument('[b]', 'VOLUME or VOLUME@SNAPSHOT (not with --since)')
      .option('--since <point>', 'changed since seq:N, time:ISO-8601 or a snapshot name (nothing declared in advance)')
      .option('--until <point>', 'with --since: as the volume was at this point (default: now)')
      .option('--json', 'print as JSON')
      .action(async function (this: Command, dir: string, a: string, b: string | undefined, opts: { since?: string; until?: string; json?: boolean }) {
        const usage = (message: string): never => this.error(`error: ${message}`, { exitCode: 2 });
        const out = new Output(opts.json === true);
        const columns = [
          { header: 'OFFSET', value: (e: DiffExtent) => `0x${e.offset.toString(16)}`, align: 'right' as const },
          { header: 'LENGTH', value: (e: DiffExtent) => `0x${e.length.toString(16)}`, align: 'right' as const },
          { header: 'SIZE', value: (e: DiffExtent) => formatSize(e.length), align: 'right' as const },
        ];
        if (opts.since !== undefined) {
          if (b !== undefined) usage('--since compares one volume with its past; give one volume, not two');
          const r = await run<{ volume: string; sinceSeq: number; untilSeq: number; extents: DiffExtent[] }>(dir, 'diff.since', { volume: a, since: opts.since, until: opts.until }, out.json);
          const total = r.extents.reduce((n, e) => n + e.length, 0);
          out.result(r, () =>
            r.extents.length === 0
              ? `${a}: nothing written between seq ${r.sinceSeq} and seq ${r.untilSeq}`
              : `${a}: ${formatSize(total)} written between seq ${r.sinceSeq} and seq ${r.untilSeq}\n${table(r.extents, columns)}`,
          );
          return;
        }
        if (opts.until !== undefined) usage('--until goes with --since');
        if (b === undefined) return usage('diff needs two volumes or snapshots, or one volume and --since');
        const extents = await run<DiffExtent[]>(dir, 'diff', { a, b }, out.json);
        out.result(extents, () => (extents.length === 0 ? `${a} and ${b} do not differ` : table(extents, columns)));
      }),
    'cowstack diff /srv/cow default@golden vm1',
    'cowstack diff /srv/cow vm1 --since golden --json     # changed blocks, for an incremental backup',
    'cowstack diff /srv/cow vm1 --since time:2026-11-25T08:00:00Z',
  );
}
