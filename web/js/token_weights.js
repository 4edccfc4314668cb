// Token weights preview on Personalize Attention Reweight (text + words) and P2P (target + reweight): the prompt
// drawn word by word, each weighted word tinted by its weight (red > 1, blue < 1, grey 0, purple < 0) and
// labelled, and entries that name no word of the prompt listed in red, before anything is queued.
import { app } from "../../../scripts/app.js"; // served at /extensions/<pack>/js/
import { weightedWords } from "./token_weights_parse.js";

const NODES = {
  PersonalizeAttentionReweight: { text: "text", weights: "words", negative: "negative_text" },
  PersonalizeP2P: { text: "target", weights: "reweight" },
};
const LINE = 16;
const MAX_LINES = 5;

function tint(weight) {
  if (weight < 0) return "#8e5bd6";
  if (weight === 0) return "#666";
  if (weight > 1) return `rgba(224, 88, 79, ${Math.min(1, 0.35 + (weight - 1) / 2)})`;
  return `rgba(74, 127, 181, ${Math.min(1, 0.35 + (1 - weight))})`;
}

// The prompt(s) the words are looked up in: apply_to uncond weighs the negative prompt's words, both either's.
function promptText(node, names) {
  const value = (name) => node.widgets?.find((w) => w.name === name)?.value ?? "";
  const applyTo = names.negative ? value("apply_to") : "cond";
  if (applyTo === "uncond") return value(names.negative);
  if (applyTo === "both") return `${value(names.text)}\n${value(names.negative)}`;
  return value(names.text);
}

function draw(ctx, node, width, y, names) {
  const text = promptText(node, names);
  const spec = node.widgets?.find((w) => w.name === names.weights)?.value;
  const { words, weights, problems } = weightedWords(text, spec);
  ctx.save();
  ctx.font = "12px sans-serif";
  ctx.textBaseline = "middle";
  let x = 10;
  let line = 0;
  for (let i = 0; i < words.length && line < MAX_LINES; i++) {
    const label = weights[i] == null ? words[i] : `${words[i]} ${weights[i]}`;
    const w = ctx.measureText(label).width + 8;
    if (x + w > width - 10 && x > 10) {
      x = 10;
      line += 1;
      if (line >= MAX_LINES) break;
    }
    const top = y + line * LINE;
    if (weights[i] != null) {
      ctx.fillStyle = tint(weights[i]);
      ctx.fillRect(x, top + 1, w - 2, LINE - 2);
    }
    ctx.fillStyle = weights[i] == null ? "#aaa" : "#fff";
    ctx.fillText(label, x + 3, top + LINE / 2);
    x += w;
  }
  if (problems.length) {
    ctx.fillStyle = "#e0584f";
    ctx.fillText(problems.join("; ").slice(0, 120), 10, y + Math.min(line + 1, MAX_LINES) * LINE + LINE / 2);
  }
  ctx.restore();
}

app.registerExtension({
  name: "personalize.tokenWeights",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const names = NODES[nodeData?.name];
    if (!names) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const node = this;
      this.addCustomWidget({
        name: "token_weights",
        type: "personalize.token_weights",
        serialize: false, // display only
        options: { serialize: false },
        computeSize: (width = node.size[0]) => [width, LINE * (MAX_LINES + 1) + 4],
        draw(ctx, _node, width, y) {
          draw(ctx, node, width, y, names);
        },
      });
      this.setSize(this.computeSize());
      return result;
    };
  },
});
