/**
 * What opening a store did besides replaying the journal, in words: the torn tail it cut and the
 * damaged seal it wrote anew. Neither is damage to what the store holds (nothing acknowledged as
 * durable was lost), so `check` stays ok, but recover, check and serve all say so.
 */
import type { OpenReport } from '@cowstack/core';

/** The records a torn tail cut, and why none of them was owed. */
export function describeTailCut(cut: NonNullable<OpenReport['tailCut']>): string {
  const why = cut.kind === 'gap' ? 'a batch that never reached LevelDB and the one written beside it; none was acknowledged' : 'their data never reached the disk';
  const restored = cut.blocksRestored > 0 ? `; ${cut.blocksRestored} block(s) they had written got their content from before the checkpoint back` : '';
  return `${cut.records} unsynced record(s) from seq ${cut.fromSeq} (${why})${restored}`;
}

/** A damaged seal and what its damage hid. */
export function describeSealDamage(reason: string): string {
  return `journal/payloads/seal was damaged (${reason}) and has been written anew; records LevelDB lost from the journal's end before that could not be noticed`;
}

/** One line per thing opening did that an operator should hear about. */
export function openNotes(report: OpenReport): string[] {
  return [
    ...(report.tailCut !== undefined ? [`torn tail cut: ${describeTailCut(report.tailCut)}`] : []),
    ...(report.sealDamage !== undefined ? [`seal rewritten: ${describeSealDamage(report.sealDamage)}`] : []),
  ];
}
