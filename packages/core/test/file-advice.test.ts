/**
 * Page-cache advice on layer files (file-advice.ts): a writable layer's file is read without
 * readahead, a frozen one's with it, and the advice follows the layer through a reopen, a snapshot
 * (its top freezes) and a commit (the layer below takes the writes again). Observed from outside, as
 * the bytes of the file the page cache holds (util-linux `fincore`) after eight sequential 4 KiB
 * reads: without readahead exactly those 32 KiB, with it more.
 */
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { Store } from '../src/index.js';
import { fileAdviceAvailable } from '../src/file-advice.js';
import { flat, tempDir } from './helpers.js';

const mib = 1024 * 1024;
const blockBytes = 4096;
const readBlocks = 8;

function run(command: string, args: string[]): string {
  const result = spawnSync(command, args, { encoding: 'utf8' });
  if (result.status !== 0) throw new Error(`${command} ${args.join(' ')} failed: ${result.error?.message ?? result.stderr}`);
  return result.stdout;
}

/** Bytes of `path` in the page cache. */
function residentBytes(path: string): number {
  return Number(run('fincore', ['--bytes', '--noheadings', '--output', 'RES', path]).trim());
}

/** Drop the file's (clean) pages from the page cache, and make sure they are gone. */
function evict(path: string): void {
  run('dd', [`if=${path}`, 'iflag=nocache', 'count=0', 'status=none']);
  assert.is(residentBytes(path), 0, `the page cache still holds ${path}: this test needs a disk file system under ${path}`);
}

/** Eight sequential 4 KiB reads at the volume's start, then the bytes of `path` cached. */
function cachedAfterSequentialReads(store: Store, path: string): number {
  evict(path);
  for (let i = 0; i < readBlocks; i++) {
    const data = flat(store.readVolume('default', i * blockBytes, blockBytes));
    assert.ok(data.equals(Buffer.alloc(blockBytes, 7)), `block ${i} reads back`);
  }
  return residentBytes(path);
}

test('a writable layer is read without readahead and a frozen one with it, through a reopen, a snapshot and a commit', async () => {
  if (process.platform === 'linux') assert.ok(fileAdviceAvailable, 'posix_fadvise is reachable through the C library on Linux');
  const dir = tempDir();
  let store = await Store.create(dir, { sizeBytes: 8 * mib });
  for (let offset = 0; offset < 8 * mib; offset += mib) await store.writeVolume('default', offset, Buffer.alloc(mib, 7), false);
  const top = store.volumeInfo('default').topLayerId;
  const topFile = join(dir, 'layers', `${top}.data`);
  await store.close();

  store = await Store.open(dir);
  assert.is(cachedAfterSequentialReads(store, topFile), readBlocks * blockBytes, 'the writable top, reopened: no readahead');

  await store.snapshot('default', 's');
  assert.is.not(store.volumeInfo('default').topLayerId, top);
  const frozen = cachedAfterSequentialReads(store, topFile);
  assert.ok(frozen > readBlocks * blockBytes, `the frozen layer reads ahead (${frozen} bytes cached)`);

  await store.deleteSnapshot('default@s');
  await store.commit('default');
  assert.is(store.volumeInfo('default').topLayerId, top, 'the commit made the layer below the top again');
  assert.is(cachedAfterSequentialReads(store, topFile), readBlocks * blockBytes, 'writable again after the commit: no readahead');
  await store.close();
});

test.run();
