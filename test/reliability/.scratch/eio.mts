import { join } from 'node:path';
import { cowstackOk, startServe, tempDir, sleep, MiB } from '../../harness.js';
import { startClient, layoutRegions } from '../torture-lib.js';
const store = join(tempDir('x'), 'store');
await cowstackOk(['init', store, '--size', '16M']);
const s = await startServe(store, { args: ['-v'] });
const regions = layoutRegions(4 * MiB, Number(process.argv[2] ?? 1000));
const clients = [0, 1].map((c) => startClient({ uri: s.uri('default'), client: c, regions: regions.filter((r) => r.id % 2 === c).map((r) => [r.id, r.start, r.length] as const), depth: 16, blockSize: 4096, seed: c + 1, contentSeed: 7, mix: JSON.parse(process.argv[3] ?? '[50,0,0,0,0]'), maxSeconds: 3 }));
await Promise.all(clients.map((c) => c.done));
for (const c of clients) { const errs = [...c.ops.values()].filter((o) => o.error); console.log('client', c.config.client, 'ops', c.ops.size, 'errors', errs.length, errs.slice(0, 3)); }
console.log(s.stderr().split('\n').filter((l) => /error|EIO|fail/i.test(l)).slice(0, 20).join('\n'));
await s.stop();
