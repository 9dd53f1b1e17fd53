// Checks fedlora's GGUF exports in real llama.cpp (@fugood/llama.node's prebuilt binaries).
// usage: node gguf_oracle.mjs NODE_MODULES CASES.json
// CASES.json: [{name, gguf, lora (a LoRA GGUF or null), tokenizer (its tokenizer.json), tolerance
// and relative (absolute and relative tolerances), expected: [fedlora generate --json --top-probs K lines]}]. For every prompt of every case:
// llama.cpp's tokenisation must equal fedlora's ids (without the BOS, which tokenize() leaves out
// and completion adds when the file says tokenizer.ggml.add_bos_token), and the next-token
// distribution llama.cpp reports must have fedlora's top-K tokens with probabilities within the
// tolerance. llama.cpp's probabilities are the sampler's: with temperature 1 and every
// truncation off they are the model's softmax.
import { createRequire } from 'node:module';
import { readFileSync } from 'node:fs';
import path from 'node:path';

const [modules, casesFile] = process.argv.slice(2);
const require = createRequire(path.join(modules, 'noop.js'));
const { loadModel, loadLlamaModelInfo } = require('@fugood/llama.node');
const cases = JSON.parse(readFileSync(casesFile, 'utf8'));

let failures = 0;
const fail = (msg) => {
  failures++;
  console.log(`  FAIL ${msg}`);
};

// GPT-2's byte ↔ printable-character map, for byte-level vocabularies.
const byteOfChar = new Map();
{
  const printable = [];
  for (let b = 33; b <= 126; b++) printable.push(b);
  for (let b = 161; b <= 172; b++) printable.push(b);
  for (let b = 174; b <= 255; b++) printable.push(b);
  let extra = 0;
  for (let b = 0; b < 256; b++) {
    byteOfChar.set(String.fromCodePoint(printable.includes(b) ? b : 256 + extra++), b);
  }
}
// The byte a token stands for when it is one byte: "<0xB9>" (SentencePiece) or one byte-level
// character; else null.
const tokenByte = (token) => {
  const sp = /^<0x([0-9A-F]{2})>$/.exec(token);
  if (sp) return parseInt(sp[1], 16);
  const chars = Array.from(token);
  return chars.length === 1 && byteOfChar.has(chars[0]) ? byteOfChar.get(chars[0]) : null;
};

for (const c of cases) {
  const tokenizer = JSON.parse(readFileSync(c.tokenizer, 'utf8'));
  const vocab = [];
  for (const [text, id] of Object.entries(tokenizer.model.vocab)) vocab[id] = text;
  for (const added of tokenizer.added_tokens ?? []) vocab[added.id] = added.content;
  const addBos = String((await loadLlamaModelInfo(c.gguf))['tokenizer.ggml.add_bos_token']) === 'true';
  // f32 everywhere: llama.cpp's default KV cache is f16, which alone moves probabilities by ~0.2%.
  const options = {
    model: c.gguf, n_ctx: 256, n_threads: 2, n_gpu_layers: 0, cache_type_k: 'f32',
    cache_type_v: 'f32', flash_attn_type: 'off',
  };
  if (c.lora) options.lora_list = [{ path: c.lora, scaled: 1.0 }];
  // A context per prompt: the bindings (1.7.15) register a completion's end only after they have
  // started it, so a completion as quick as these tiny models' can leave the context busy for
  // good ("Another completion is in progress") and its later answers unreliable.
  let worst = 0, worstRelative = 0;
  for (const e of c.expected) {
    const ctx = await loadModel(options);
    const tokenized = Array.from((await ctx.tokenize(e.prompt)).tokens);
    // Every sampler that reshapes the distribution off — the bindings' defaults turn XTC (which
    // at random keeps a single token) and DRY on.
    const result = await ctx.completion({
      prompt: e.prompt, n_predict: 1, n_probs: e.top[0].length, temperature: 1, top_k: 0,
      top_p: 1, min_p: 0, xtc_probability: 0, dry_multiplier: 0, penalty_last_n: 0,
    });
    // llama.cpp names tokens by their text: fedlora's ids are turned into llama.cpp's pieces.
    // A piece that is one byte of an unfinished UTF-8 sequence is "byte: \\xNN" there, with the
    // byte read from the token's spelling in tokenizer.json.
    const want = [];
    for (const t of e.top[0]) {
      let piece = await ctx.detokenize([t.id]);
      const byte = tokenByte(vocab[t.id] ?? '');
      if (piece === '\ufffd' && byte !== null) piece = `byte: \\x${byte.toString(16).padStart(2, '0')}`;
      want.push({ piece, p: t.p, id: t.id });
    }
    await ctx.release();
    const ours = addBos ? e.prompt_ids.slice(1) : e.prompt_ids;
    if (JSON.stringify(tokenized) !== JSON.stringify(ours)) {
      fail(`${c.name}: ${JSON.stringify(e.prompt)} tokenised by llama.cpp as ` +
           `${JSON.stringify(tokenized)}, by fedlora as ${JSON.stringify(ours)}`);
      continue;
    }
    if (result.completion_probabilities.length !== 1) {
      fail(`${c.name}: llama.cpp gave ${result.completion_probabilities.length} steps' probabilities`);
      continue;
    }
    const theirs = result.completion_probabilities[0].probs;
    // Each probability within the absolute tolerance and, since a large vocabulary spreads the
    // mass thin, within the relative one too. Neighbours that close may come in either order.
    const close = (a, b) => Math.abs(a - b) <= Math.min(c.tolerance, c.relative * Math.max(a, b));
    for (const [i, w] of want.entries()) {
      const j = theirs.findIndex((t) => t.tok_str === w.piece && close(t.prob, w.p));
      // A token missing at the edge of the top K may have traded places with a near tie.
      const tieAtEdge = close(w.p, theirs.at(-1).prob);
      if (j < 0 && !tieAtEdge) {
        fail(`${c.name}: ${JSON.stringify(e.prompt)}: fedlora's #${i + 1} token ${w.id} ` +
             `${JSON.stringify(w.piece)} p=${w.p.toFixed(6)} is not in llama.cpp's top ` +
             `${theirs.length}: ${JSON.stringify(theirs.map((t) => [t.tok_str, +t.prob.toFixed(6)]))}`);
        break;
      }
      if (j >= 0) {
        worst = Math.max(worst, Math.abs(theirs[j].prob - w.p));
        worstRelative = Math.max(worstRelative, Math.abs(theirs[j].prob - w.p) / w.p);
      }
    }
  }
  console.log(`${c.name}: ${c.expected.length} prompts, largest probability difference ` +
              `${worst.toExponential(2)} (relative ${worstRelative.toExponential(2)})`);
}
if (failures) {
  console.log(`${failures} mismatches`);
  process.exit(1);
}
console.log('every case agrees with llama.cpp');
