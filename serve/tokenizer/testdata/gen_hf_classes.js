// Regenerates hf_classes.txt: the class Hugging Face tokenizers' GLM-4.5
// pre-tokenizer regex gives every code point (\p{L}, \p{N}, \s, newline or
// other), found by probing the real pre-tokenizer.
//
//   npm install tokenizers@0.23.2
//   node serve/tokenizer/testdata/gen_hf_classes.js   (from the repo root; ~30 s)
const { Tokenizer } = require('tokenizers');
const fs = require('fs');
const path = require('path');

const tok = Tokenizer.fromFile(path.join(__dirname, '../../../testdata/text/tokenizer/tokenizer.json'));
const pt = tok.getPreTokenizer();
const pieces = (s) => pt.preTokenizeString(s).length;

const lines = [
  '# Pre-tokenizer rune classes of Hugging Face tokenizers 0.23.2 (Oniguruma, Unicode 16) for every code point,',
  '# as runs: first code point (hex) and class (0 other, 1 letter, 2 number, 3 space, 4 newline). Surrogates read as 0.',
  '# Made by gen_hf_classes.js.',
];
let prev = -1;
for (let cp = 0; cp < 0x110000; cp++) {
  let cls = 0;
  if (cp < 0xd800 || cp >= 0xe000) {
    const c = String.fromCodePoint(cp);
    if (cp === 10 || cp === 13) cls = 4;
    else if (pieces('a' + c + 'b') === 1) cls = 1; // [^\r\n\p{L}\p{N}]?\p{L}+ joins letters
    else if (pieces('1' + c) === 1) cls = 2; // \p{N}{1,3} joins numbers
    else if (pieces('!' + c) === 1) cls = 0; // [^\s\p{L}\p{N}]+ joins other runes
    else cls = 3; // whitespace splits from '!'
  }
  if (cls !== prev) {
    lines.push(cp.toString(16) + ' ' + cls);
    prev = cls;
  }
}
fs.writeFileSync(path.join(__dirname, 'hf_classes.txt'), lines.join('\n') + '\n');
