// Regenerates hf_golden.json: random texts and id sequences with the ids and
// text Hugging Face tokenizers gives for them on the GLM-4.5-pipeline fixture.
//
//   npm install tokenizers@0.23.2   (the HF Rust library's Node binding)
//   node serve/tokenizer/testdata/gen_hf_golden.js   (from the repo root)
const { Tokenizer } = require('tokenizers');
const fs = require('fs');
const path = require('path');

const fixture = path.join(__dirname, '../../../testdata/text/tokenizer/tokenizer.json');
let seed = 20261127;
const rnd = () => { seed = (seed * 1103515245 + 12345) % 2147483648; return seed / 2147483648; };
const pick = (a) => a[Math.floor(rnd() * a.length)];

// Atoms that exercise every branch of the pre-tokenizer regex, Unicode
// classes (letters, numbers, marks, separators, \x1c..\x1f, NEL), contractions
// in both cases, added tokens and near-misses, and long runs (heap BPE path).
const atoms = [...'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789',
  ' ', ' ', '  ', '\t', '\n', '\r', '\r\n', '\u00a0', '\u3000', '\u2003', '\u0085', '\u001c', '\u000b', '\u000c',
  "'", "'s", "'S", "'ll", "'LL", "'re", "'Ve", "'d", "'m", "'t", "'\u017f", '\u017f', '!', '?', '.', ',', ';', '(', ')',
  '{', '}', '"', '_', '-', '/', '\\', '中', '文', '日本', '한', 'é', '\u0301', 'ß', 'ẞ', 'Ω', 'π', '٣', '७', '①', '½',
  '²', 'Ⅳ', '😀', '👍🏽', '👨\u200d👩', '\u200b', '\ufeff', '\ufffd', '<|user|>', '<think>', '</think>', '[gMASK]',
  '<sop>', '/nothink', '<|endoftext|>', '<', '|', '>', '<|', '<|user|', 'x'.repeat(20), ' '.repeat(20), '\n\n\n',
  'ab', 'the', ' the', 'ing', 'tion', '12', '123', '1234', '\u2028', '\u2029', '\u1680', '\u205f', '\u00ad', '\u0600'];

(async () => {
  const tok = Tokenizer.fromFile(fixture);
  const encode = [];
  const add = async (text) => {
    const e = await tok.encode(text, null, { addSpecialTokens: false });
    encode.push({ text, ids: Array.from(e.getIds()) });
  };
  for (let n = 0; n < 1200; n++) {
    const k = pick([1, 2, 3, 5, 8, 13, 30, 80]);
    let s = '';
    for (let i = 0; i < k; i++) s += pick(atoms);
    await add(s);
  }
  for (let n = 0; n < 20; n++) {
    const len = 30 + Math.floor(rnd() * 300);
    let s = '';
    for (let i = 0; i < len; i++) s += pick(['a', 'b', 'ab', 'ba', 'x', 'xx', 'y', 'e', 's', 'th', 'he']);
    await add(s);
    await add(' '.repeat(40 + Math.floor(rnd() * 200)) + 'z');
  }
  const decode = [];
  for (let n = 0; n < 600; n++) {
    const ids = [];
    const len = 1 + Math.floor(rnd() * 12);
    for (let i = 0; i < len; i++) {
      const r = rnd();
      ids.push(r < 0.1 ? 1003 + Math.floor(rnd() * 21) : r < 0.6 ? 94 + Math.floor(rnd() * 162) : Math.floor(rnd() * 1003));
    }
    decode.push({ ids, text: await tok.decode(ids, false), text_skip_special: await tok.decode(ids, true) });
  }
  const out = { generator: 'tokenizers 0.23.2 (npm), gen_hf_golden.js', encode, decode };
  fs.writeFileSync(path.join(__dirname, 'hf_golden.json'), JSON.stringify(out));
})();
