// Parsing for the token weights preview (no ComfyUI imports, so it can be checked outside the browser).
// It follows attention/tokens.py parse_word_weights: "word or phrase:weight", comma or new line; the last colon
// separates the weight.
const DECIMAL = /^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$/i;
// ComfyUI's prompt weights "(red:1.3)": the number is not a word of the prompt
const PROMPT_WEIGHT = /:\s*[-+]?(\d+\.?\d*|\.\d+)\s*\)/g;
// CLIP's tokenizer splits words at these, so "red" is found in "red-car" and "(red)" (attention/tokens.py)
const SEPARATORS = /[\s,()\[\]{}-]+/;

function lookupWords(text) {
  return String(text).toLowerCase().split(SEPARATORS).map((w) => w.replace(/^[.;:!?'"]+|[.;:!?'"]+$/g, ""))
    .filter(Boolean);
}

export function parseWeights(spec) {
  const parsed = [];
  for (const raw of String(spec ?? "").split(/[,\n]/)) {
    const entry = raw.trim();
    if (!entry) continue;
    const colon = entry.lastIndexOf(":");
    const phrase = colon > 0 ? entry.slice(0, colon).trim().toLowerCase() : "";
    const number = colon > 0 ? entry.slice(colon + 1).trim() : "";
    // decimal only, as Python's float(): Number() would also take "", "0x10" and "0b1"
    const weight = DECIMAL.test(number) ? Number(number) : NaN;
    parsed.push({ entry, phrase, weight, ok: phrase !== "" && Number.isFinite(weight) });
  }
  return parsed;
}

// Weights per word of the prompt (split at spaces, as drawn): a phrase weights each word holding one of its parts
// where all its parts appear in order.
export function weightedWords(text, spec) {
  const words = String(text ?? "").split(/\s+/).filter(Boolean);
  const parts = [];
  const owner = [];
  words.forEach((word, i) => {
    for (const part of lookupWords(word.replace(PROMPT_WEIGHT, ")"))) {
      parts.push(part);
      owner.push(i);
    }
  });
  const weights = new Array(words.length).fill(null);
  const problems = [];
  const seen = new Set();
  for (const item of parseWeights(spec)) {
    if (!item.ok) {
      problems.push(`'${item.entry}' needs word:number`);
      continue;
    }
    const key = item.phrase.split(/\s+/).join(" ");
    if (seen.has(key)) {
      problems.push(`'${item.phrase}' is given twice`); // the node refuses it (attention/tokens.py)
      continue;
    }
    seen.add(key);
    const phrase = lookupWords(item.phrase);
    let found = false;
    for (let i = 0; phrase.length && i + phrase.length <= parts.length; i++) {
      if (phrase.every((p, j) => parts[i + j] === p)) {
        phrase.forEach((_, j) => (weights[owner[i + j]] = item.weight));
        found = true;
      }
    }
    if (!found) problems.push(`'${item.phrase}' is not in the prompt`);
  }
  return { words, weights, problems };
}
