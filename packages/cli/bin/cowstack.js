#!/usr/bin/env node
// The `cowstack` command. Runs the built CLI (pnpm install builds it through the root `prepare` script).
import { main } from '../dist/main.js';

process.exitCode = await main(process.argv.slice(2));
