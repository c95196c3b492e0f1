/**
 * Payload repair: a write's payload in the journal's payload log that fails its CRC (bit rot, a
 * stray write) or is missing from a short segment is rebuilt from the layer file the write went to,
 * when that file still holds the write's blocks. Each block is taken only if it has the CRC32C the
 * Write event recorded for it, and the journal accepts the whole payload back only if it has the
 * payload CRC the frame recorded (Journal.rewritePayload), so a repair restores the journaled bytes
 * exactly or does nothing. A block written again since (in the same layer), damaged in the layer file
 * too, or in a layer that is gone cannot give the payload back, nor can one whose payload segment,
 * the newest, was removed by hand (Journal.payloadRewriteObstacle); such payloads stay damaged and
 * are reported with the reason. Check asks the same question and gives the same answer.
 *
 * Only durable records are repaired: a damaged payload past the last durable seq is a torn tail,
 * which opening the store cuts. `recover --force` runs this before anything else, so a payload the
 * layer files still hold costs no record; the store is at rest (the caller holds it).
 */
import { join } from 'node:path';
import { crc32c } from '@node-rs/crc32';
import { type Journal, JournalError, type VerifyProblem } from '@cowstack/journal';
import { firstValueFrom } from 'rxjs';
import { assert } from './errors.js';
import { EventType, eventTypeName, type StoreEvent } from './events.js';
import { readAt } from './read-at.js';

/** A damaged write payload written back from its layer file. */
export interface PayloadRepair {
  readonly seq: number;
  readonly layerId: number;
  readonly firstBlock: number;
  readonly blocks: number;
}

/** A damaged write payload that could not be rebuilt, and why. */
export interface PayloadUnrepaired {
  readonly seq: number;
  readonly reason: string;
}

export interface PayloadRepairReport {
  readonly repaired: PayloadRepair[];
  readonly unrepaired: PayloadUnrepaired[];
  /** The journal's problems after the repairs (the last verify's), for callers that need them too. */
  readonly problems: VerifyProblem[];
}

/**
 * Rebuild every damaged durable payload of `journal` whose blocks `layersDir` still holds. Verifies
 * again after each round of repairs, as a repair can uncover a damaged payload behind it in the same
 * frame (verify names the first payload missing from a frame).
 */
export async function repairPayloads(journal: Journal<StoreEvent>, layersDir: string): Promise<PayloadRepairReport> {
  const repaired: PayloadRepair[] = [];
  const unrepaired: PayloadUnrepaired[] = [];
  const tried = new Set<number>();
  for (;;) {
    const { problems } = await journal.verify();
    const damaged = problems.filter((p) => isPayloadDamage(p) && p.tornTail !== true && !tried.has(p.seq));
    if (damaged.length === 0) return { repaired, unrepaired, problems };
    for (const { seq } of damaged) {
      tried.add(seq);
      const outcome = await repairPayload(journal, layersDir, seq);
      if ('reason' in outcome) unrepaired.push(outcome);
      else repaired.push(outcome);
    }
  }
}

/** A damaged or missing payload of a record whose frame is whole. */
export function isPayloadDamage(p: VerifyProblem): boolean {
  return p.kind === 'payload-crc' || p.kind === 'payload-missing';
}

async function repairPayload(journal: Journal<StoreEvent>, layersDir: string, seq: number): Promise<PayloadRepair | PayloadUnrepaired> {
  const rebuilt = await rebuildPayload(journal, layersDir, seq);
  if ('reason' in rebuilt) return rebuilt;
  const { bytes, ...repair } = rebuilt;
  try {
    await journal.rewritePayload(seq, bytes);
  } catch (err) {
    if (err instanceof JournalError) return { seq, reason: err.message };
    throw err;
  }
  return repair;
}

/**
 * The payload of write `seq` as its layer file still holds it (every block with the CRC the write
 * recorded), or why it cannot be had. Reads only: check uses it to say whether `recover --force` can
 * mend a damaged payload.
 */
export async function rebuildPayload(journal: Journal<StoreEvent>, layersDir: string, seq: number): Promise<(PayloadRepair & { readonly bytes: Buffer }) | PayloadUnrepaired> {
  const obstacle = await journal.payloadRewriteObstacle(seq);
  if (obstacle !== undefined) return { seq, reason: obstacle };
  const record = await firstValueFrom(journal.replay(seq, seq, { payloads: false }));
  const event = record.meta;
  if (event[0] !== EventType.Write) return { seq, reason: `record seq ${seq} is a ${eventTypeName(event)} event; only write payloads can be rebuilt from a layer file` };
  const [, layerId, firstBlock, blocks, crcs] = event;
  const blockBytes = record.payloadLength / blocks;
  assert(Number.isSafeInteger(blockBytes) && blockBytes > 0, `write seq ${seq}'s payload is whole blocks`);
  let bytes: Buffer;
  try {
    bytes = readAt(join(layersDir, `${layerId}.data`), firstBlock * blockBytes, record.payloadLength);
  } catch (err) {
    return { seq, reason: `layer ${layerId}'s data file cannot be read (${(err as Error).message})` };
  }
  const differ: number[] = [];
  for (let i = 0; i < blocks; i++) {
    const block = bytes.subarray(i * blockBytes, (i + 1) * blockBytes);
    if (crc32c(block) !== crcs.readUInt32LE(4 * i)) differ.push(firstBlock + i);
  }
  if (differ.length > 0) {
    const shown = differ.length > 4 ? `${differ.slice(0, 4).join(', ')} and ${differ.length - 4} more` : differ.join(', ');
    return { seq, reason: `layer ${layerId} no longer holds it: ${differ.length} of its ${blocks} block(s) (${shown}) differ from what the write recorded (written again since, or damaged)` };
  }
  return { seq, layerId, firstBlock, blocks, bytes };
}
