/**
 * The `cowstack` command line: subcommands in the conventions of qemu-img and nbdkit. Exit codes:
 * 0 success, 1 a reported problem (an error, or damage found by check), 2 a usage error.
 * Arguments are parsed by commander; every command has --help with an example. A command whose
 * stdout reader goes away (a pipe into `head`) stops quietly instead of dying on EPIPE.
 */
import { Command, CommanderError } from 'commander';
import { exitOk, exitProblem, exitUsage, ProblemsFound } from './command-helpers.js';
import { registerHistoryCommands } from './commands/history-commands.js';
import { registerJournalCommands } from './commands/journal-commands.js';
import { registerLayerCommands } from './commands/layer-commands.js';
import { registerStoreCommands } from './commands/store-commands.js';

function program(): Command {
  const root = new Command('cowstack')
    .description('A journaled, stackable copy-on-write block store exported over NBD')
    .version('0.1.0')
    .showHelpAfterError('(add --help for usage)')
    .exitOverride()
    .configureOutput({ writeErr: (s) => process.stderr.write(s) });
  registerStoreCommands(root);
  registerLayerCommands(root);
  registerHistoryCommands(root);
  registerJournalCommands(root);
  root.commands.forEach(function walk(c: Command): void {
    c.exitOverride();
    c.showHelpAfterError('(add --help for usage)');
    c.commands.forEach(walk);
  });
  return root;
}

/** A reader that stops reading (`cowstack journal inspect STORE | head`) ends the command quietly. */
function quietOnClosedStdout(): void {
  process.stdout.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code !== 'EPIPE') throw err;
    process.exit(exitOk);
  });
}

/** What to run when damage keeps a store from opening (README, "Damage and salvage"). */
const damageHint = 'cowstack: hint: `cowstack check STORE` lists all the damage; `cowstack recover --force STORE` mends or salvages it (README: "Damage and salvage")';

export async function main(argv: string[]): Promise<number> {
  const json = argv.includes('--json');
  quietOnClosedStdout();
  try {
    await program().parseAsync(argv, { from: 'user' });
    return exitOk;
  } catch (err) {
    if (err instanceof CommanderError) {
      // `commander.help` with a non-zero exitCode is help shown because no subcommand was given.
      if (err.code === 'commander.helpDisplayed' || err.code === 'commander.version' || (err.code === 'commander.help' && err.exitCode === 0)) return exitOk;
      return exitUsage;
    }
    if (err instanceof ProblemsFound) return exitProblem;
    const code = (err as { code?: string }).code;
    const message = (err as Error).message ?? String(err);
    if (json) process.stdout.write(`${JSON.stringify({ error: { code: code ?? 'ERROR', message } })}\n`);
    process.stderr.write(`cowstack: error: ${message}\n`);
    // Damage refused an open: say what to run next (recover --force is that already).
    if (code === 'ECORRUPT' && !(argv[0] === 'recover' && argv.includes('--force'))) process.stderr.write(`${damageHint}\n`);
    if (process.env.COWSTACK_DEBUG) process.stderr.write(`${(err as Error).stack}\n`);
    return exitProblem;
  }
}
