/**
 * Benchmark: fio's nbd engine against this server (serving a RAM device that answers reads with views
 * of one Buffer, so the numbers are the protocol layer's cost) and, side by side, against nbdkit's
 * memory plugin when nbdkit is installed. Unix sockets; a sequential write pass first faults every
 * page in on both servers; then each job runs for SECONDS (default 5).
 *   node --conditions=source --import tsx packages/nbd/bench/nbd-bench.ts [SECONDS]
 * Prints one line per (server, job): IOPS and MB/s.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { BlockDevice, Extent, ExtentContext, ReadResult } from '@cowstack/core';
import { NbdServer } from '../src/index.js';

const seconds = Number(process.argv[2] ?? 5);
const sizeBytes = 1024 * 1024 * 1024;

class RamDevice implements BlockDevice {
  readonly sizeBytes = sizeBytes;
  readonly readOnly = false;
  readonly blockSizeBytes = 4096;
  readonly canMultiConn = true;
  readonly canFastZero = true;
  readonly extentContexts: readonly ExtentContext[] = ['base:allocation'];
  private readonly data = Buffer.alloc(sizeBytes);
  async read(offset: number, length: number): Promise<ReadResult> {
    return this.data.subarray(offset, offset + length);
  }
  async write(offset: number, data: Buffer): Promise<void> {
    data.copy(this.data, offset);
  }
  async zero(offset: number, length: number): Promise<void> {
    this.data.fill(0, offset, offset + length);
  }
  async trim(offset: number, length: number): Promise<void> {
    this.data.fill(0, offset, offset + length);
  }
  async flush(): Promise<void> {}
  async cache(): Promise<void> {}
  async extents(_offset: number, length: number): Promise<Extent[]> {
    return [{ length, hole: false, zero: false, depth: 1 }];
  }
}

function run(command: string, args: string[]): Promise<number | null> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { stdio: 'ignore' });
    child.on('error', reject);
    child.on('close', resolve);
  });
}

const jobs = [
  { name: '4k randread qd16', args: ['--rw=randread', '--bs=4k', '--iodepth=16'] },
  { name: '4k randwrite qd16', args: ['--rw=randwrite', '--bs=4k', '--iodepth=16'] },
  { name: '1M read qd8', args: ['--rw=read', '--bs=1M', '--iodepth=8'] },
  { name: '1M write qd8', args: ['--rw=write', '--bs=1M', '--iodepth=8'] },
];

/** One sequential pass over the whole export so no job pays for first-touch page faults. */
async function warmUp(uri: string): Promise<void> {
  await run('fio', ['--name=warmup', '--ioengine=nbd', `--uri=${uri}`, '--size=1G', '--rw=write', '--bs=1M', '--iodepth=8']);
}

async function fio(uri: string, job: (typeof jobs)[number], dir: string): Promise<string> {
  const output = join(dir, 'fio.json');
  const code = await run('fio', ['--name=bench', '--ioengine=nbd', `--uri=${uri}`, '--size=1G', '--time_based', `--runtime=${seconds}`, ...job.args, `--output=${output}`, '--output-format=json']);
  if (code !== 0) return 'fio failed';
  const report = JSON.parse(readFileSync(output, 'utf8')).jobs[0];
  const side = job.name.includes('read') ? report.read : report.write;
  return `${Math.round(side.iops).toString().padStart(8)} IOPS ${(side.bw_bytes / 1e6).toFixed(0).padStart(6)} MB/s`;
}

const dir = mkdtempSync(join(tmpdir(), 'cowstack-nbd-bench-'));
try {
  const socketPath = join(dir, 'cowstack.sock');
  const server = new NbdServer({ provider: { list: () => [{ name: '', description: '' }], open: () => device } });
  const device = new RamDevice();
  await server.listen({ socketPath });
  await warmUp(`nbd+unix:///?socket=${socketPath}`);
  for (const job of jobs) console.log(`cowstack  ${job.name.padEnd(18)} ${await fio(`nbd+unix:///?socket=${socketPath}`, job, dir)}`);
  await server.close();

  const kitSocket = join(dir, 'nbdkit.sock');
  const nbdkit = spawn('nbdkit', ['--foreground', '--unix', kitSocket, 'memory', '1G'], { stdio: 'ignore' });
  const started = await new Promise<boolean>((resolve) => {
    nbdkit.on('error', () => resolve(false));
    setTimeout(() => resolve(true), 500);
  });
  if (started) {
    await warmUp(`nbd+unix:///?socket=${kitSocket}`);
    for (const job of jobs) console.log(`nbdkit    ${job.name.padEnd(18)} ${await fio(`nbd+unix:///?socket=${kitSocket}`, job, dir)}`);
    nbdkit.kill();
  } else console.log('nbdkit not installed: no comparison');
} finally {
  rmSync(dir, { recursive: true, force: true });
}
