// Parsing for the token weights preview (no ComfyUI imports, so it can be checked outside the browser).
// It follows attention/tokens.py parse_word_weights: "word or phrase:weight", comma or new line; the last colon
// separates the weight.
export function parseWeights(spec) {
  const parsed = [];
  for (const raw of String(spec ?? "").split(/[,\n]/)) {
    const entry = raw.trim();
    if (!entry) continue;
    const colon = entry.lastIndexOf(":");
    const phrase = colon > 0 ? entry.slice(0, colon).trim().toLowerCase() : "";
    const number = colon > 0 ? entry.slice(colon + 1).trim() : "";
    const weight = number === "" ? NaN : Number(number); // Number("") is 0; Python's float("") refuses
    parsed.push({ entry, phrase, weight, ok: phrase !== "" && Number.isFinite(weight) });
  }
  return parsed;
}

// Weights per word index: a phrase weights each of its words where the whole phrase appears in order.
export function weightedWords(text, spec) {
  const words = String(text ?? "").split(/\s+/).filter(Boolean);
  const lower = words.map((w) => w.toLowerCase().replace(/^[(\[{]+|[)\]},.;!?]+$/g, ""));
  const weights = new Array(words.length).fill(null);
  const problems = [];
  for (const item of parseWeights(spec)) {
    if (!item.ok) {
      problems.push(`'${item.entry}' needs word:number`);
      continue;
    }
    const phrase = item.phrase.split(/\s+/);
    let found = false;
    for (let i = 0; i + phrase.length <= lower.length; i++) {
      if (phrase.every((p, j) => lower[i + j] === p)) {
        phrase.forEach((_, j) => (weights[i + j] = item.weight));
        found = true;
      }
    }
    if (!found) problems.push(`'${item.phrase}' is not in the prompt`);
  }
  return { words, weights, problems };
}

