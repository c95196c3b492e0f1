/**
 * A 1 TiB volume with a handful of writes (DESIGN.md: the merged index is O(extents), so such a
 * volume must stay cheap): writes at the start, the middle and the last block, a 2 GB write-zeroes,
 * a snapshot; block status over the whole device answers at once and is exactly right, reads at both
 * ends return the data, and the server's resident memory stays small.
 */
import { strict as assert } from 'node:assert';
import { readFileSync } from 'node:fs';
import { test } from 'uvu';
import { cowstackOk, initStore, killAll, runOk, startServe } from './harness.js';

test.after.each(killAll);

const TiB = 1024 ** 4;

function rssBytes(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(m![1]) * 1024;
}

interface Extent {
  offset: number;
  length: number;
  type: number;
}

async function map(uri: string, context: string): Promise<Array<[number, number, number]>> {
  const started = Date.now();
  const extents = JSON.parse((await runOk('nbdinfo', ['--json', `--map=${context}`, uri])).stdout) as Extent[];
  assert.ok(Date.now() - started < 5000, `block status over 1 TiB took ${Date.now() - started} ms`);
  const out: Array<[number, number, number]> = [];
  for (const e of extents) {
    const prev = out[out.length - 1];
    if (prev !== undefined && prev[2] === e.type && prev[0] + prev[1] === e.offset) prev[1] += e.length;
    else out.push([e.offset, e.length, e.type]);
  }
  return out;
}

test('1 TiB volume with a few writes: exact maps, reads at both ends, small memory', async () => {
  const store = await initStore({ size: '1T' });
  const server = await startServe(store);
  const uri = server.uri('default');
  const mid = TiB / 2;
  const last = TiB - 4096;
  // Aligned start (qemu-io splits write-zeroes into 32 MiB requests from the start, so an unaligned
  // start would make every piece begin mid-block), unaligned end: one partial block written with
  // zeroes, the whole blocks recorded as zero.
  const zeroAt = 3 * 1024 ** 3;
  const zeroLength = 2_000_000_000;
  await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x01 0 4096', '-c', `write -P 0x02 ${mid} 65536`, '-c', `write -P 0x03 ${last} 4096`, '-c', `write -z ${zeroAt} ${zeroLength}`, uri]);
  await cowstackOk(['snapshot', store, 'default', '--name', 's']);
  await runOk('qemu-io', ['-f', 'raw', '-c', `write -P 0x04 ${mid + 4096} 4096`, uri]);

  const zeroEnd = zeroAt + zeroLength;
  const zeroLastWhole = Math.floor(zeroEnd / 4096) * 4096;
  assert.deepEqual(await map(uri, 'base:allocation'), [
    [0, 4096, 0],
    [4096, zeroLastWhole - 4096, 3], // holes, then the recorded zeroes
    [zeroLastWhole, 4096, 0], // the partial last block of the write-zeroes holds data (zeroes)
    [zeroLastWhole + 4096, mid - zeroLastWhole - 4096, 3],
    [mid, 65536, 0],
    [mid + 65536, last - mid - 65536, 3],
    [last, 4096, 0],
  ]);
  assert.deepEqual(await map(uri, 'qemu:allocation-depth'), [
    [0, 4096, 2],
    [4096, zeroAt - 4096, 0],
    [zeroAt, zeroLastWhole + 4096 - zeroAt, 2],
    [zeroLastWhole + 4096, mid - zeroLastWhole - 4096, 0],
    [mid, 4096, 2],
    [mid + 4096, 4096, 1],
    [mid + 8192, 65536 - 8192, 2],
    [mid + 65536, last - mid - 65536, 0],
    [last, 4096, 2],
  ]);
  await runOk('qemu-io', ['-f', 'raw', '-c', 'read -P 0x01 0 4096', '-c', `read -P 0x02 ${mid} 4096`, '-c', `read -P 0x04 ${mid + 4096} 4096`, '-c', `read -P 0 ${zeroAt} 1000000`, '-c', `read -P 0x03 ${last} 4096`, '-c', `read -P 0 ${last - 1000000} 1000000`, uri]);
  await runOk('qemu-io', ['-r', '-f', 'raw', '-c', `read -P 0x02 ${mid + 4096} 4096`, '-c', `read -P 0x03 ${last} 4096`, server.uri('default@s')]);

  const rss = rssBytes(server.child.pid!);
  assert.ok(rss < 256 * 1024 * 1024, `cowstack serve uses ${Math.round(rss / 1048576)} MiB for a sparse 1 TiB volume`);
  await server.stop();
});

test.run();
