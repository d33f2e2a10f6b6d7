#!/usr/bin/env node
'use strict';
/**
 * grym-node: command-line client of the grym-synth Orchestrator (Node.js).
 *
 *   grym-node [--target HOST:PORT] [--timeout S] [--json] health
 *   grym-node [...] analyze WAV [--features]
 *   grym-node [...] stream WAV [--chunk-frames N]      (StreamAnalyze: one line per window, then the final one)
 *
 * --json prints one JSON object per line (per event for streams) for scripts and tests; the default is one
 * human-readable line. Exit status: 0 ok, 1 RPC failed, 2 usage error, 3 health not SERVING.
 */
const fs = require('node:fs');
const grpc = require('@grpc/grpc-js');
const { GrymClient, readWavPcm } = require('../src/client');

const USAGE = `usage: grym-node [--target HOST:PORT] [--timeout SECONDS] [--json] COMMAND
commands:
  health                          grpc.health.v1 Check of the whole server; prints the status (SERVING)
  analyze WAV [--features]        AnalyzeAudio; prints frames and embedding length
  stream WAV [--chunk-frames N]   StreamAnalyze; prints each window's result in order, then the final one
environment: GRYM_TARGET (default 127.0.0.1:50051)`;

class UsageError extends Error {}

function parseArgs(argv) {
  const opts = { target: process.env.GRYM_TARGET || '127.0.0.1:50051', timeoutS: 60, json: false, features: false, chunkFrames: 8000 };
  const positional = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new UsageError(`${arg} needs a value`);
      return argv[++i];
    };
    if (arg === '--target') opts.target = value();
    else if (arg === '--timeout') opts.timeoutS = Number(value());
    else if (arg === '--json') opts.json = true;
    else if (arg === '--features') opts.features = true;
    else if (arg === '--chunk-frames') opts.chunkFrames = Number.parseInt(value(), 10);
    else if (arg === '-h' || arg === '--help') throw new UsageError('');
    else if (arg.startsWith('--')) throw new UsageError(`unknown option ${arg}`);
    else positional.push(arg);
  }
  if (!(opts.timeoutS > 0)) throw new UsageError('--timeout must be > 0');
  if (!(opts.chunkFrames > 0)) throw new UsageError('--chunk-frames must be > 0');
  if (positional.length === 0) throw new UsageError('missing command');
  return { opts, command: positional[0], args: positional.slice(1) };
}

function needFile(args, what) {
  if (args.length !== 1) throw new UsageError(`${what} needs exactly one WAV path`);
  return args[0];
}

function fmt(x) {
  return Number(x).toFixed(3);
}

async function run({ opts, command, args }) {
  const client = new GrymClient(opts.target, { timeoutS: opts.timeoutS });
  try {
    if (command === 'health') {
      if (args.length) throw new UsageError('health takes no arguments');
      const status = await client.checkHealth('');
      console.log(opts.json ? JSON.stringify({ status }) : status);
      return status === 'SERVING' ? 0 : 3;
    }
    if (command === 'analyze') {
      const res = await client.analyzeWav(fs.readFileSync(needFile(args, 'analyze')), { includeFeatures: opts.features });
      const out = {
        request_id: res.request_id,
        frames: res.frames,
        embedding_len: res.embedding.length,
        duration_seconds: res.duration_seconds,
        model: res.model,
        profile: res.profile,
      };
      if (opts.features && res.features) out.features_shape = [res.features.rows, res.features.cols];
      if (opts.json) console.log(JSON.stringify({ ...out, embedding: res.embedding }));
      else {
        const extra = out.features_shape ? ` features=${out.features_shape.join('x')}` : '';
        console.log(`frames=${out.frames} embedding_len=${out.embedding_len} duration_s=${fmt(out.duration_seconds)} ` +
          `model=${out.model} profile=${out.profile} request_id=${out.request_id}${extra}`);
      }
      return 0;
    }
    if (command === 'stream') {
      const pcm = readWavPcm(fs.readFileSync(needFile(args, 'stream')));
      for await (const ev of client.streamAnalyze(pcm, { chunkFrames: opts.chunkFrames })) {
        const out = {
          request_id: ev.request_id,
          is_final: ev.is_final,
          window_index: ev.window_index,
          start_seconds: ev.start_seconds,
          end_seconds: ev.end_seconds,
          frames: ev.frames,
          embedding_len: ev.embedding.length,
        };
        if (opts.json) console.log(JSON.stringify({ ...out, embedding: ev.embedding }));
        else console.log(`${out.is_final ? 'final ' : 'window'} index=${out.window_index} ` +
          `start_s=${fmt(out.start_seconds)} end_s=${fmt(out.end_seconds)} frames=${out.frames} embedding_len=${out.embedding_len}`);
      }
      return 0;
    }
    throw new UsageError(`unknown command ${command}`);
  } finally {
    client.close();
  }
}

async function main() {
  let parsed;
  try {
    parsed = parseArgs(process.argv.slice(2));
    return await run(parsed);
  } catch (err) {
    if (err instanceof UsageError) {
      if (err.message) console.error(`error: ${err.message}`);
      console.error(USAGE);
      return 2;
    }
    if (err && typeof err.code === 'number' && grpc.status[err.code] !== undefined) {
      console.error(`error: ${grpc.status[err.code]}: ${err.details}`);
    } else {
      console.error(`error: ${err && err.message ? err.message : err}`);
    }
    return 1;
  }
}

main().then((code) => {
  process.exitCode = code;
});
