/**
 * fio's nbd engine against `cowstack serve`:
 * 1. two jobs (two connections), iodepth 16, 4 KiB random writes for 4 seconds with crc32c
 *    verification both while running (verify_backlog) and at the end; zero errors, and the verify
 *    reads really happened;
 * 2. a deterministic random-write job of mixed block sizes without verification, then a clean
 *    restart of the server, then `--verify_only` of the same job: what fio wrote survived the restart.
 */
import { strict as assert } from 'node:assert';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'uvu';
import { initStore, killAll, run, startServe, tempDir } from './harness.js';

test.after.each(killAll);

interface FioJob {
  jobname: string;
  error: number;
  read: { io_bytes: number; total_ios: number };
  write: { io_bytes: number; total_ios: number };
}

async function fio(uri: string, args: string[], timeoutMs = 60_000): Promise<FioJob[]> {
  const out = join(tempDir('fio'), 'fio.json');
  const full = ['--name=e2e', '--ioengine=nbd', `--uri=${uri}`, '--output-format=json', `--output=${out}`, ...args];
  const r = await run('fio', full, { timeoutMs });
  let text = '';
  try {
    text = readFileSync(out, 'utf8');
  } catch {
    // reported below
  }
  assert.equal(r.code, 0, `fio ${full.join(' ')} exited ${r.code}\n${r.stdout}\n${r.stderr}\n${text}`);
  // fio may put a notice line before the JSON document.
  const json = JSON.parse(text.slice(text.indexOf('{'))) as { jobs: FioJob[] };
  return json.jobs;
}

test('fio randwrite with crc32c verification, iodepth 16, two connections, 4 seconds', async () => {
  const store = await initStore({ size: '256M' });
  const server = await startServe(store);
  const jobs = await fio(server.uri('default'), [
    '--rw=randwrite',
    '--bs=4k',
    '--iodepth=16',
    '--numjobs=2',
    '--size=64M',
    '--offset_increment=128M',
    '--time_based',
    '--runtime=4',
    '--verify=crc32c',
    '--verify_backlog=4096',
    '--verify_fatal=1',
  ]);
  assert.equal(jobs.length, 2);
  for (const job of jobs) {
    assert.equal(job.error, 0, `fio job error ${job.error}`);
    assert.ok(job.write.total_ios > 1000, `only ${job.write.total_ios} writes in 4 s`);
    // Verification reads back what was written: at least the backlog's worth.
    assert.ok(job.read.total_ios >= 4096, `only ${job.read.total_ios} verify reads`);
  }
  await server.stop();
});

test('fio writes survive a clean restart (--verify_only after restart)', async () => {
  const store = await initStore({ size: '64M' });
  const job = ['--rw=randwrite', '--bsrange=512-64k', '--iodepth=16', '--size=48M', '--offset=1000448', '--randseed=1234', '--verify=crc32c'];
  const first = await startServe(store);
  const [written] = await fio(first.uri('default'), [...job, '--do_verify=0']);
  assert.equal(written.error, 0);
  assert.equal(written.write.io_bytes, 48 * 1024 * 1024);
  await first.stop();

  const second = await startServe(store);
  const [verified] = await fio(second.uri('default'), [...job, '--verify_only', '--verify_fatal=1']);
  assert.equal(verified.error, 0);
  assert.ok(verified.read.io_bytes > 40 * 1024 * 1024, `verify_only read ${verified.read.io_bytes} bytes`);
  await second.stop();
});

test.run();
