/**
 * Serves in-memory exports on a unix socket for manual runs of real clients (nbdinfo, qemu-io, fio):
 *   node --conditions=source --import tsx packages/nbd/bench/serve-memory.ts [SIZE_MIB] [SOCKET]
 * Exports: 'disk' (writable, the default) and 'ro' (read-only, 1 MiB). Prints the socket path; stops on
 * SIGINT/SIGTERM.
 */
import { join } from 'node:path';
import { tmpdir } from 'node:os';
import { NbdServer } from '../src/index.js';
import { MapProvider, MemoryDevice } from '../test/memory-device.js';

const sizeMiB = Number(process.argv[2] ?? 256);
const socketPath = process.argv[3] ?? join(tmpdir(), `cowstack-nbd-${process.pid}.sock`);
const provider = MapProvider.of(
  { disk: new MemoryDevice({ sizeBytes: sizeMiB * 1024 * 1024 }), ro: new MemoryDevice({ sizeBytes: 1 << 20, readOnly: true }) },
  'disk',
  { disk: 'in-memory disk', ro: 'read-only' },
);
const server = new NbdServer({ provider, log: (m) => console.error(m) });
await server.listen({ socketPath });
console.log(socketPath);
for (const signal of ['SIGINT', 'SIGTERM'] as const) process.once(signal, () => void server.close());
