// Live loss chart on Personalize training nodes. The server sends "personalize.loss" events
// ({node, start, losses, step, total}) while a node trains; each node keeps its curve in a canvas widget
// (a widget, so the node layout reserves its space).
import { app } from "../../../scripts/app.js"; // served at /extensions/<pack>/js/
import { api } from "../../../scripts/api.js";
import { nodeForExecutionId } from "./execution_node.js";

const TRAINERS = new Set(["PersonalizeTrainLoRA", "PersonalizeTrainDreamBooth", "PersonalizeTrainTextualInversion",
  "PersonalizeTrainPivotal", "PersonalizeFastTune"]);
const CHART_HEIGHT = 110;

function drawChart(ctx, data, width, y) {
  const left = 10;
  const w = width - 20;
  const h = CHART_HEIGHT - 8;
  ctx.save();
  ctx.fillStyle = "#1b1b1b";
  ctx.fillRect(left, y, w, h);
  ctx.font = "11px sans-serif";
  ctx.fillStyle = "#999";
  const losses = (data?.losses ?? []).filter((v) => Number.isFinite(v));
  if (losses.length < 2) {
    ctx.fillText("loss chart: appears while training", left + 6, y + h / 2);
    ctx.restore();
    return;
  }
  const sorted = [...losses].sort((a, b) => a - b);
  const lo = sorted[Math.floor(0.01 * (sorted.length - 1))];
  const hi = sorted[Math.ceil(0.99 * (sorted.length - 1))];
  const span = hi - lo || 1;
  const plotTop = y + 4;
  const plotH = h - 20;
  const py = (v) => plotTop + plotH * (1 - (Math.min(Math.max(v, lo), hi) - lo) / span);
  const px = (i) => left + 4 + ((w - 8) * i) / (losses.length - 1);
  const line = (values, color, lineWidth) => {
    ctx.strokeStyle = color;
    ctx.lineWidth = lineWidth;
    ctx.beginPath();
    values.forEach((v, i) => (i ? ctx.lineTo(px(i), py(v)) : ctx.moveTo(px(i), py(v))));
    ctx.stroke();
  };
  line(losses, "#4a7fb5", 1);
  let ema = losses[0];
  line(losses.map((v, i) => (ema = i ? 0.9 * ema + 0.1 * v : v)), "#e0584f", 2);
  ctx.fillStyle = "#ccc";
  const last = losses[losses.length - 1].toFixed(4);
  ctx.fillText(`step ${data.step}/${data.total}  loss ${last}`, left + 6, y + h - 5); // blue raw, red EMA
  ctx.restore();
}

app.registerExtension({
  name: "personalize.lossChart",
  async setup() {
    api.addEventListener("personalize.loss", ({ detail }) => {
      if (!detail || detail.node == null) return;
      // The curve lives on the node object it belongs to: a node of the same id in another subgraph or in a
      // workflow opened later never shows it, and it goes with its workflow when that is closed.
      const node = nodeForExecutionId(app.rootGraph ?? app.graph, detail.node);
      if (!node || !TRAINERS.has(node.comfyClass ?? node.type)) return; // its workflow is not the one shown
      const data = node.personalizeLoss ?? { losses: [], step: 0, total: detail.total };
      if (detail.start === 0) data.losses = [];
      data.losses.splice(detail.start, detail.losses.length, ...detail.losses);
      Object.assign(data, { step: detail.step, total: detail.total });
      node.personalizeLoss = data;
      app.canvas?.setDirty(true, false);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!TRAINERS.has(nodeData?.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const node = this;
      this.addCustomWidget({
        name: "loss_chart",
        type: "personalize.loss_chart",
        serialize: false, // display only: never part of the saved workflow's widget values
        options: { serialize: false }, // nor of the prompt; the frontend also reads options on every widget
        computeSize: (width = node.size[0]) => [width, CHART_HEIGHT],
        draw(ctx, _node, width, y) {
          drawChart(ctx, node.personalizeLoss, width, y);
        },
      });
      this.setSize(this.computeSize());
      return result;
    };
  },
});
