/**
 * recover and check: the two maintenance passes an operator runs on a store at rest.
 *
 * recover: open the store (which loads the newest usable checkpoint, replays every later event,
 * re-applies the data of their writes to the layer files and writes a fresh checkpoint), close it,
 * and report what it did. With force, a journal damaged beyond a torn tail is cut at its first
 * damaged record that no checkpoint before it covers (see recoverStore, cutPoint), and records lost
 * where a checkpoint holds the state they made (a gap or a damaged frame before it, or the history
 * before a journal salvage resumed) are recorded in the journal's metadata as accepted losses (see
 * recordLosses). Before any of that, force writes damaged write payloads back from the layer files
 * that still hold their blocks (payload-repair.ts): a payload mended so costs no record, where the
 * cut would have discarded it and everything after it.
 *
 * check: after the same recovery, verify three things and name every problem found:
 *   - the journal: chained CRCs, no gaps, payload CRCs (by seq);
 *   - the projection: replaying the whole journal from seq 1 with the one reducer gives exactly the
 *     projection the store loaded (checkpoint + tail), layer by layer;
 *   - the data: every block a layer holds as data has the CRC32C its last Write event recorded
 *     (by volume, layer, block and seq).
 * An accepted loss is a note, not a problem: check replays the records around it, cannot compare the
 * projection, and verifies only the blocks last written after it (it says how many it could not).
 * A damaged payload or checkpoint does not stop the replay (it reads neither); each damaged payload's
 * problem says whether recover --force can write it back from a layer file. One that cannot be, at or
 * before the checkpoint, recover --force records as an accepted loss of that payload alone: a note,
 * with nothing else left unchecked.
 */
import { crc32c } from '@node-rs/crc32';
import { join, resolve } from 'node:path';
import { Journal, JournalError, type JournalRecord, type TableSalvageReport, type VerifyProblem, type VerifyReport } from '@cowstack/journal';
import { lastValueFrom, scan } from 'rxjs';
import { StoreError } from './errors.js';
import { EventType, type StoreEvent } from './events.js';
import { lockJournal } from './journal-lock.js';
import { applyEvent, BlockState, emptyProjection, volumesUsing } from './projection.js';
import { diffProjections } from './projection-codec.js';
import { type PayloadRepair, type PayloadRepairReport, type PayloadUnrepaired, isPayloadDamage, rebuildPayload, repairPayloads } from './payload-repair.js';
import { type OpenReport, type ProgressCallback, Store, toStoreError } from './store.js';

/** Records lost where a checkpoint holds the state they made, recorded by `recover --force`. */
export interface AcceptedLoss {
  readonly fromSeq: number;
  readonly toSeq: number;
  readonly reason: string;
  /**
   * Only the write payload of record `fromSeq` is lost (damaged, and it cannot be rebuilt from a
   * layer file); the record is whole, so check replays and verifies as before, and only views of the
   * past that need the payload fail.
   */
  readonly payloadOnly?: true;
  /** When recover --force recorded it (ms since the epoch). */
  readonly recordedMs: number;
}

/** Journal metadata key of the accepted losses. */
const acceptedLossesMetaKey = 'accepted-losses';

export interface RecoverReport extends OpenReport {
  readonly eventsPerSecond: number;
  /** Losses this run recorded (with --force; see AcceptedLoss); check reports them as notes from then on. */
  readonly lossesRecorded: AcceptedLoss[];
  /**
   * With --force: damaged write payloads rebuilt from the layer files that still held their blocks
   * (nothing discarded for them), and those that could not be, with why (see payload-repair.ts).
   */
  readonly payloadsRepaired: PayloadRepair[];
  readonly payloadsUnrepaired: PayloadUnrepaired[];
  /**
   * With --force, after damage: the first damaged seq, why, and how many records from there on were
   * discarded (everything after the damage is lost; everything before it is kept). `tables` says
   * which damaged LevelDB files were set aside first, when any were.
   */
  readonly salvage:
    | {
        readonly fromSeq: number;
        readonly reason: string;
        readonly recordsDiscarded: number;
        readonly writesReapplied: number;
        readonly tables: TableSalvageReport | undefined;
      }
    | undefined;
}

/**
 * Recover a store. With `force`, a store that will not open because its journal is damaged is
 * salvaged:
 *   - damaged LevelDB files first (see Journal.salvageTables): damaged tables are set aside in
 *     `journal/damaged/`, the MANIFEST is rebuilt, and what the tables still held is written back.
 *     If the store then opens, the records lost with them were older than its newest checkpoint and
 *     nothing more is cut;
 *   - then the journal is cut at the first damaged record that no checkpoint before it covers (the
 *     damaged record and every record after it are discarded, acknowledged or not; damage the
 *     checkpoint covers is recorded as an accepted loss instead, see cutPoint), the store opens
 *     from its newest usable checkpoint as usual, and every retained write payload is written to
 *     its layer file again, so blocks that discarded events had overwritten get their last kept
 *     content back (blocks whose payloads retention already dropped, or whose kept payload is
 *     damaged, cannot be restored; check names them).
 * Damaged checkpoints need no force: older ones are used automatically.
 */
export async function recoverStore(dir: string, options: { onProgress?: ProgressCallback; force?: boolean } = {}): Promise<RecoverReport> {
  let salvage: RecoverReport['salvage'];
  let store: Store | undefined;
  let repairs: PayloadRepairReport | undefined;
  let failure: unknown;
  try {
    store = await Store.open(dir, { onProgress: options.onProgress });
  } catch (err) {
    if (!isDamage(err, options.force)) throw err;
    failure = err;
    // Damaged payloads the layer files still hold are written back first: that discards nothing.
    repairs = await repairPayloadsAlone(dir);
    if (repairs !== undefined && repairs.repaired.length > 0) store = await openUnlessDamaged(dir, options, (again) => (failure = again));
  }
  if (store === undefined) {
    const tables = await salvageTables(dir);
    if (tables !== undefined) {
      store = await openUnlessDamaged(dir, options, (again) => (failure = again));
      if (store !== undefined) salvage = { fromSeq: store.openReport.lastSeq + 1, reason: describeTableSalvage(tables), recordsDiscarded: 0, writesReapplied: 0, tables };
    }
    if (store === undefined) {
      const cut = await cutAtDamage(dir);
      if (cut === undefined) {
        if (tables === undefined) throw failure;
        throw new StoreError('ECORRUPT', `${(failure as Error).message} (after recover --force set damaged LevelDB files aside: ${describeTableSalvage(tables)})`, { cause: failure });
      }
      // Blocks the discarded events had overwritten get their last kept journaled content back: every
      // retained write is re-applied during the replay, before the new checkpoint drops payloads.
      const reason = tables === undefined ? cut.reason : `${describeTableSalvage(tables)}; then ${cut.reason}`;
      store = await Store.open(dir, { onProgress: options.onProgress, reapplyRetained: true }).catch((last: unknown) => {
        if (!(last instanceof StoreError)) throw last;
        throw new StoreError(last.code, `${last.message} (after recover --force discarded ${cut.recordsDiscarded} journal record(s) from seq ${cut.fromSeq}: ${reason})`, { cause: last });
      });
      salvage = { ...cut, reason, writesReapplied: store.openReport.writesReapplied, tables };
    }
  }
  let lossesRecorded: AcceptedLoss[] = [];
  try {
    if (options.force === true) {
      // Payloads damaged where opening does not read them (at or before the checkpoint).
      const open = await repairPayloads(store.eventLog, join(store.dir, 'layers'));
      // Those that could not be mended before opening stay reported, also when the cut took them.
      const earlier = (repairs?.unrepaired ?? []).filter((u) => !open.unrepaired.some((o) => o.seq === u.seq));
      repairs = { repaired: [...(repairs?.repaired ?? []), ...open.repaired], unrepaired: [...earlier, ...open.unrepaired], problems: open.problems };
      lossesRecorded = await recordLosses(store, open.problems, repairs.unrepaired);
    }
  } finally {
    await store.close();
  }
  const report = store.openReport;
  return {
    ...report,
    eventsPerSecond: report.durationMs > 0 ? (report.eventsReplayed / report.durationMs) * 1000 : 0,
    salvage,
    lossesRecorded,
    payloadsRepaired: repairs?.repaired ?? [],
    payloadsUnrepaired: repairs?.unrepaired ?? [],
  };
}

/** Open the store; undefined (after telling `onDamage`) when it is still damaged. */
async function openUnlessDamaged(dir: string, options: { onProgress?: ProgressCallback }, onDamage: (err: StoreError) => void): Promise<Store | undefined> {
  try {
    return await Store.open(dir, { onProgress: options.onProgress });
  } catch (err) {
    if (!isDamage(err, true)) throw err;
    onDamage(err);
    return undefined;
  }
}

/**
 * repairPayloads on the journal of a store that will not open; undefined when the journal itself
 * will not open either (its damage is for table salvage and the cut).
 */
async function repairPayloadsAlone(dir: string): Promise<PayloadRepairReport | undefined> {
  let journal: Journal<StoreEvent>;
  try {
    journal = await Journal.open<StoreEvent>(join(resolve(dir), 'journal'));
  } catch (err) {
    if (err instanceof JournalError && err.code === 'ECORRUPT') return undefined;
    throw toStoreError(err, dir);
  }
  try {
    return await repairPayloads(journal, join(resolve(dir), 'layers'));
  } finally {
    await journal.close();
  }
}

/**
 * Record the losses an opened store is whole without, each once: gaps and damaged frames at or
 * before the checkpoint it opened from (among `problems`, its journal's verify), damaged payloads
 * there that repairPayloads could not rebuild (`unrepaired` says why), and the records before a
 * journal that no longer starts at seq 1 (a salvage resumed it after a checkpoint). Returns the ones
 * recorded now.
 */
async function recordLosses(store: Store, problems: readonly VerifyProblem[], unrepaired: readonly PayloadUnrepaired[]): Promise<AcceptedLoss[]> {
  const journal = store.eventLog;
  const known = await acceptedLosses(journal);
  const checkpointSeq = store.openReport.checkpointSeq;
  const found: Array<Omit<AcceptedLoss, 'recordedMs'>> = [];
  if (journal.firstSeq > 1) {
    found.push({ fromSeq: 1, toSeq: journal.firstSeq - 1, reason: `the journal's records before seq ${journal.firstSeq} are gone; its checkpoints hold the state they made` });
  }
  for (const p of problems) {
    if (coveredThrough(p) > checkpointSeq) continue;
    const lost = passedOver(p);
    if (lost !== undefined) {
      const what = p.kind === 'gap' ? 'are missing' : `cannot be read (${p.message})`;
      found.push({ ...lost, reason: `records seq ${lost.fromSeq}..${lost.toSeq} ${what}; the checkpoint at seq ${checkpointSeq} holds the state they made` });
    } else {
      // A damaged payload left after repairPayloads, which says why it could not rebuild it.
      const why = unrepaired.find((u) => u.seq === p.seq)?.reason ?? 'no layer file gives it back';
      found.push({ fromSeq: p.seq, toSeq: p.seq, payloadOnly: true, reason: `${p.message}; it cannot be rebuilt: ${why}; the checkpoint at seq ${checkpointSeq} holds the state it made` });
    }
  }
  const recordedMs = Date.now();
  const fresh = found.filter((f) => !known.some((k) => k.fromSeq === f.fromSeq && k.toSeq === f.toSeq && k.payloadOnly === f.payloadOnly)).map((f) => ({ ...f, recordedMs }));
  if (fresh.length > 0) await journal.putMeta(acceptedLossesMetaKey, [...known, ...fresh]);
  return fresh;
}

async function acceptedLosses(journal: Journal<StoreEvent>): Promise<AcceptedLoss[]> {
  return (await journal.getMeta<AcceptedLoss[]>(acceptedLossesMetaKey)) ?? [];
}

/** A journal problem, and the accepted loss that covers it when one does. */
export type VerifiedProblem = VerifyProblem & { readonly accepted?: AcceptedLoss };

/** What verifyStoreJournal finds: a journal verify report whose problems say which losses were accepted. */
export type StoreJournalReport = Omit<VerifyReport, 'problems'> & { problems: VerifiedProblem[] };

/**
 * `journal.verify()` of a store's journal, with each gap or damaged frame an accepted loss covers
 * marked `accepted`: `ok` counts only the others (as check does).
 */
export async function verifyStoreJournal(journal: Journal<StoreEvent>): Promise<StoreJournalReport> {
  const report = await journal.verify();
  const accepted = await acceptedLosses(journal);
  const problems = report.problems.map((p): VerifiedProblem => {
    const lost = passedOver(p);
    const loss = lost !== undefined ? acceptedLossOf(accepted, lost.fromSeq, lost.toSeq) : isPayloadDamage(p) ? accepted.find((a) => a.payloadOnly === true && a.fromSeq === p.seq) : undefined;
    return loss === undefined ? p : { ...p, accepted: loss };
  });
  return { ...report, ok: problems.every((p) => p.accepted !== undefined), problems };
}

/**
 * The records a journal problem costs, when a checkpoint can stand in for them: a gap's, or a damaged
 * frame's (with any missing up to the next frame). Not a torn tail (opening cuts it), not a damaged
 * payload (its record is whole; payload-repair.ts mends it).
 */
function passedOver(p: VerifyProblem): { fromSeq: number; toSeq: number } | undefined {
  if (p.tornTail === true || p.fromSeq === undefined || p.toSeq === undefined) return undefined;
  return { fromSeq: p.fromSeq, toSeq: p.toSeq };
}

/**
 * The newest seq a checkpoint must reach to hold the state a journal problem's records made: the end
 * of a gap or damaged frame, or a damaged payload's own record (whole: only its bytes are bad).
 */
function coveredThrough(p: VerifyProblem): number {
  if (isPayloadDamage(p) && p.tornTail !== true) return p.seq;
  return passedOver(p)?.toSeq ?? Infinity;
}

/** The accepted loss of records that covers records fromSeq..toSeq, if one does. */
function acceptedLossOf(accepted: readonly AcceptedLoss[], fromSeq: number, toSeq: number): AcceptedLoss | undefined {
  return accepted.find((a) => a.payloadOnly !== true && fromSeq >= a.fromSeq && toSeq <= a.toSeq);
}

function isDamage(err: unknown, force: boolean | undefined): err is StoreError {
  return force === true && err instanceof StoreError && err.code === 'ECORRUPT';
}

/** Set damaged LevelDB files aside under the journal's lock (see Journal.salvageTables). */
async function salvageTables(dir: string): Promise<TableSalvageReport | undefined> {
  const release = lockJournal(dir);
  try {
    return await Journal.salvageTables(join(resolve(dir), 'journal'));
  } catch (err) {
    if (err instanceof JournalError) throw new StoreError(err.code === 'ELOCKED' ? 'ELOCKED' : 'EIO', `store ${dir}: ${err.message}`, { cause: err });
    throw err;
  } finally {
    release();
  }
}

/** What table salvage did, in one sentence for the report. */
function describeTableSalvage(tables: TableSalvageReport): string {
  const parts = tables.tables.map(
    (t) =>
      `LevelDB table ${t.file} was damaged (${t.problem.replace(/^LevelDB file \S+ is damaged: /, '')}) and is set aside as journal/${t.movedTo}: ${t.blocksLost} of ${t.dataBlocks} data block(s) lost${t.lost.length > 0 ? ` (${t.lost.join('; ')})` : ''}, ${t.entriesRestored} entr${t.entriesRestored === 1 ? 'y' : 'ies'} written back`,
  );
  if (tables.manifestProblem !== undefined) parts.push(`LevelDB's MANIFEST was damaged (${tables.manifestProblem}) and has been rebuilt`);
  if (tables.formatRewritten) parts.push("the journal's format record was lost and has been written anew");
  if (tables.retentionRebuilt) parts.push("the journal's retention record was lost and has been rebuilt");
  const resumed = tables.resumedAfterCheckpoint;
  if (resumed !== undefined) {
    parts.push(`records seq ${resumed.fromSeq}..${resumed.throughSeq} were lost, but the checkpoint at seq ${resumed.throughSeq} holds the state they made: the journal resumes after it, its older records dropped`);
  }
  return parts.join('; ');
}

/** Find the journal record to cut at (see cutPoint) and discard it and everything after it. */
async function cutAtDamage(dir: string): Promise<{ fromSeq: number; reason: string; recordsDiscarded: number } | undefined> {
  const journal = await Journal.open<StoreEvent>(join(resolve(dir), 'journal'), { skipDamagedTail: true });
  try {
    const lost = journal.lostTail;
    if (lost !== undefined) {
      // LevelDB dropped the last records: nothing to cut, but say what is gone and reset the seal.
      await journal.discardFrom(lost.fromSeq);
      return {
        fromSeq: lost.fromSeq,
        reason: `records seq ${lost.fromSeq}..${lost.toSeq} were committed but LevelDB lost them (its write-ahead log was damaged)`,
        recordsDiscarded: lost.toSeq - lost.fromSeq + 1,
      };
    }
    const verify = await verifyStoreJournal(journal);
    const damaged = new Set(verify.problems.filter((p) => p.kind === 'checkpoint').map((p) => p.seq));
    const cut = cutPoint(verify.problems, (await journal.checkpointSeqs()).filter((seq) => !damaged.has(seq)));
    let fromSeq: number;
    let reason: string;
    if (cut !== undefined) {
      fromSeq = cut.seq;
      reason = cut.message;
    } else if (journal.lastSeq < (await journal.lastFrameKeySeq())) {
      // Only the damaged tail frames were wrong, and open skipped them.
      fromSeq = journal.lastSeq + 1;
      reason = `the journal's last frames after seq ${journal.lastSeq} cannot be decoded`;
    } else if (journal.rebuiltRetention) {
      // Nothing to cut: the damaged retention record was rebuilt from the frames and checkpoints.
      return { fromSeq: journal.lastSeq + 1, reason: "the journal's retention record was damaged and has been rebuilt", recordsDiscarded: 0 };
    } else {
      return undefined;
    }
    const recordsDiscarded = await journal.discardFrom(fromSeq);
    return { fromSeq, reason, recordsDiscarded };
  } finally {
    await journal.close();
  }
}

/**
 * Where to cut a damaged journal: at the latest problem such that the newest checkpoint before it
 * holds the state of every problem's records before it (a gap, a damaged frame or a damaged payload
 * that the store, opening from that checkpoint, never reads; recordLosses then accepts them).
 * Losses recover --force accepted earlier are no damage to cut at. Cutting at old damage a
 * checkpoint covers would discard the checkpoint and every record after it; the first problem is
 * always a valid cut.
 */
function cutPoint(problems: readonly VerifiedProblem[], checkpointSeqs: readonly number[]): VerifiedProblem | undefined {
  const damage = problems.filter((p) => p.kind !== 'checkpoint' && p.accepted === undefined);
  for (let k = damage.length - 1; k > 0; k--) {
    const checkpoint = Math.max(0, ...checkpointSeqs.filter((seq) => seq < damage[k].seq));
    if (damage.slice(0, k).every((p) => coveredThrough(p) <= checkpoint)) return damage[k];
  }
  return damage[0];
}

export type CheckProblemKind = 'open' | 'journal' | 'checkpoint' | 'projection' | 'data';

export interface CheckProblem {
  readonly kind: CheckProblemKind;
  readonly message: string;
  readonly seq?: number;
  readonly layerId?: number;
  readonly volumes?: readonly string[];
  readonly block?: number;
}

export interface CheckReport {
  readonly ok: boolean;
  readonly problems: CheckProblem[];
  /** Accepted losses met, and what they kept check from verifying. */
  readonly notes: string[];
  readonly eventsChecked: number;
  readonly dataBlocksChecked: number;
  /** Data blocks last written before an accepted loss: what they should hold is not known. */
  readonly dataBlocksUnverifiable: number;
  /** What opening (recovery) did before the checks; undefined if the store could not be opened. */
  readonly open: OpenReport | undefined;
  readonly durationMs: number;
}

export async function checkStore(dir: string, options: { onProgress?: ProgressCallback } = {}): Promise<CheckReport> {
  const started = performance.now();
  const problems: CheckProblem[] = [];
  let store: Store;
  try {
    store = await Store.open(dir, { onProgress: options.onProgress });
  } catch (err) {
    if (err instanceof StoreError && (err.code === 'ECORRUPT' || err.code === 'ECHANGED' || err.code === 'EFORMAT')) {
      problems.push({ kind: 'open', message: err.message });
      return { ok: false, problems, notes: [], eventsChecked: 0, dataBlocksChecked: 0, dataBlocksUnverifiable: 0, open: undefined, durationMs: performance.now() - started };
    }
    throw err;
  }
  let eventsChecked = 0;
  let dataBlocksChecked = 0;
  let dataBlocksUnverifiable = 0;
  const notes: string[] = [];
  try {
    const journal = store.eventLog;
    // The accepted losses met: their records (or, payloadOnly, a payload) are missing as recorded.
    const lost = new Set<AcceptedLoss>();
    const payloadsLost = new Set<AcceptedLoss>();
    const verify = await verifyStoreJournal(journal);
    for (const p of verify.problems) {
      if (p.accepted !== undefined) (p.accepted.payloadOnly === true ? payloadsLost : lost).add(p.accepted);
      else if (isPayloadDamage(p)) {
        // Say whether recover --force can mend it (from the layer file that still holds its blocks).
        const rebuilt = await rebuildPayload(journal, join(store.dir, 'layers'), p.seq);
        const remedy = 'reason' in rebuilt ? `it cannot be rebuilt: ${rebuilt.reason}` : `recover --force can write it back from layer ${rebuilt.layerId}'s data file`;
        problems.push({ kind: 'journal', seq: p.seq, message: `${p.message}; ${remedy}` });
      } else problems.push({ kind: p.kind === 'checkpoint' ? 'checkpoint' : 'journal', seq: p.seq, message: p.message });
    }
    // The replay below reads no payloads and no checkpoints: damage to those leaves it possible.
    const replayable = verify.problems.every((p) => p.accepted !== undefined || p.kind === 'checkpoint' || isPayloadDamage(p));
    for (const s of store.openReport.checkpointsSkipped) problems.push({ kind: 'checkpoint', seq: s.seq, message: `checkpoint at seq ${s.seq} was not usable: ${s.reason}` });
    const history = journal.firstSeq > 1 ? acceptedLossOf(await acceptedLosses(journal), 1, journal.firstSeq - 1) : undefined;
    if (history !== undefined) lost.add(history);
    if (journal.firstSeq > 1 && history === undefined) {
      problems.push({ kind: 'projection', message: `the journal starts at seq ${journal.firstSeq} (the records before it are gone), so neither the projection nor the data blocks can be checked against the whole history` });
    } else if (replayable) {
      // Replay the journal with the same reducer, remembering each block's last write: from seq 1,
      // or around the accepted losses (whose state the checkpoints hold).
      const lastWrite = new Map<number, Map<number, [seq: number, crc: number]>>();
      const total = journal.lastSeq;
      const losses = [...lost].sort((a, b) => a.fromSeq - b.fromSeq);
      let from = journal.firstSeq;
      const segments: Array<[number, number]> = [];
      for (const loss of losses) {
        if (loss.fromSeq > from) segments.push([from, loss.fromSeq - 1]);
        from = Math.max(from, loss.toSeq + 1);
      }
      if (from <= journal.lastSeq) segments.push([from, journal.lastSeq]);
      let replayed = { ...emptyProjection(), deferViews: true };
      for (const [first, last] of segments) {
        replayed = await lastValueFrom(
          journal.replayFrames(first, last, { payloads: false }).pipe(
            scan((state, records) => {
              for (const record of records) {
                trackWrites(lastWrite, record);
                if (losses.length === 0) applyEvent(state, record.seq, record.meta);
                eventsChecked++;
                if ((eventsChecked & 0xffff) === 0) options.onProgress?.('check-journal', eventsChecked, total);
              }
              return state;
            }, replayed),
          ),
          { defaultValue: replayed },
        );
      }
      if (losses.length === 0) {
        for (const difference of diffProjections(replayed, store.projection)) {
          problems.push({ kind: 'projection', message: `replaying the journal from seq 1 does not give the loaded projection: ${difference}` });
        }
      }
      const lostThroughSeq = losses.reduce((m, l) => Math.max(m, l.toSeq), 0);
      ({ checked: dataBlocksChecked, unverifiable: dataBlocksUnverifiable } = checkData(store, lastWrite, problems, lostThroughSeq, options.onProgress));
      for (const loss of losses) notes.push(`records seq ${loss.fromSeq}..${loss.toSeq} are lost, accepted by recover --force at ${new Date(loss.recordedMs).toISOString()}: ${loss.reason}`);
      if (losses.length > 0) {
        notes.push(`with them lost, the projection was not compared with a replay, and ${dataBlocksUnverifiable} data block(s) last written at or before seq ${lostThroughSeq} could not be verified`);
      }
    }
    for (const loss of payloadsLost) {
      notes.push(`the payload of write seq ${loss.fromSeq} is lost, accepted by recover --force at ${new Date(loss.recordedMs).toISOString()}: ${loss.reason}; a view of the past that needs it fails`);
    }
  } finally {
    await store.close();
  }
  return { ok: problems.length === 0, problems, notes, eventsChecked, dataBlocksChecked, dataBlocksUnverifiable, open: store.openReport, durationMs: performance.now() - started };
}

function trackWrites(lastWrite: Map<number, Map<number, [number, number]>>, record: JournalRecord<StoreEvent>): void {
  const event = record.meta;
  if (event[0] === EventType.Write) {
    const [, layerId, first, count, crcs] = event;
    let blocks = lastWrite.get(layerId);
    if (blocks === undefined) lastWrite.set(layerId, (blocks = new Map()));
    for (let i = 0; i < count; i++) blocks.set(first + i, [record.seq, crcs.readUInt32LE(4 * i)]);
  } else if (event[0] === EventType.Zero) {
    const [, layerId, first, count] = event;
    const blocks = lastWrite.get(layerId);
    if (blocks === undefined) return;
    if (count > blocks.size) {
      for (const block of blocks.keys()) if (block >= first && block < first + count) blocks.delete(block);
    } else {
      for (let i = 0; i < count; i++) blocks.delete(first + i);
    }
  }
}

/**
 * Verify every data block against the CRC its last write recorded. A block last written at or before
 * `lostThroughSeq` (an accepted loss's end; 0: none) is counted as unverifiable instead: a lost record
 * may have written it since.
 */
function checkData(store: Store, lastWrite: Map<number, Map<number, [number, number]>>, problems: CheckProblem[], lostThroughSeq: number, onProgress?: ProgressCallback): { checked: number; unverifiable: number } {
  const state = store.projection;
  const bs = store.blockSizeBytes;
  let total = 0;
  for (const layer of state.layers.values()) {
    if (layer.kind !== 'external') layer.bitmap.forEachSetRun((_s, n, v) => (total += v === BlockState.Data ? n : 0));
  }
  let done = 0;
  let unverifiable = 0;
  for (const layer of state.layers.values()) {
    if (layer.kind === 'external') continue;
    const blocks = lastWrite.get(layer.id) ?? new Map<number, [number, number]>();
    const runs: Array<[number, number]> = [];
    layer.bitmap.forEachSetRun((start, n, v) => {
      if (v === BlockState.Data) runs.push([start, n]);
    });
    for (const [start, n] of runs) {
      for (let b = start; b < start + n; b += 256) {
        const count = Math.min(256, start + n - b);
        let data: Buffer;
        try {
          data = store.readLayerFile(layer.id, b * bs, count * bs);
        } catch (err) {
          problems.push({ kind: 'data', layerId: layer.id, volumes: volumesUsing(state, layer.id), block: b, message: `layer ${layer.id} blocks ${b}..${b + count - 1}: ${(err as Error).message}` });
          continue;
        }
        for (let i = 0; i < count; i++) {
          const block = b + i;
          const expected = blocks.get(block);
          if (lostThroughSeq > 0 && (expected === undefined || expected[0] <= lostThroughSeq)) {
            unverifiable++;
            continue;
          }
          const volumes = volumesUsing(state, layer.id);
          const where = `${volumes.length > 0 ? `volume ${volumes.join(', ')}, ` : ''}layer ${layer.id}, block ${block} (offset ${block * bs})`;
          if (expected === undefined) {
            problems.push({ kind: 'data', layerId: layer.id, volumes, block, message: `${where}: holds data but no write event records it` });
            continue;
          }
          const actual = crc32c(data.subarray(i * bs, (i + 1) * bs));
          if (actual !== expected[1]) {
            problems.push({
              kind: 'data',
              layerId: layer.id,
              volumes,
              block,
              seq: expected[0],
              message: `${where}: data CRC ${hex(actual)} does not match CRC ${hex(expected[1])} of its last write, seq ${expected[0]}`,
            });
          }
        }
        done += count;
        onProgress?.('check-data', done, total);
      }
    }
  }
  return { checked: done - unverifiable, unverifiable };
}

function hex(n: number): string {
  return '0x' + (n >>> 0).toString(16).padStart(8, '0');
}
