// Live loss chart on Personalize training nodes. The server sends "personalize.loss" events
// ({node, start, losses, step, total}) while a node trains; we keep the curve per node and draw it under the widgets.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TRAINERS = new Set(["PersonalizeTrainLoRA"]);
const CHART_HEIGHT = 90;
const curves = new Map(); // node id -> {losses: number[], step, total}

function drawChart(ctx, node, data) {
  const w = node.size[0] - 20;
  const top = node.size[1] - CHART_HEIGHT - 6;
  ctx.save();
  ctx.fillStyle = "#1b1b1b";
  ctx.fillRect(10, top, w, CHART_HEIGHT);
  const losses = data.losses.filter((v) => Number.isFinite(v));
  if (losses.length > 1) {
    const sorted = [...losses].sort((a, b) => a - b);
    const lo = sorted[Math.floor(0.01 * (sorted.length - 1))];
    const hi = sorted[Math.ceil(0.99 * (sorted.length - 1))];
    const span = hi - lo || 1;
    const y = (v) => top + 4 + (CHART_HEIGHT - 18) * (1 - (Math.min(Math.max(v, lo), hi) - lo) / span);
    const x = (i) => 10 + (w * i) / Math.max(losses.length - 1, 1);
    ctx.strokeStyle = "#4a7fb5";
    ctx.beginPath();
    losses.forEach((v, i) => (i ? ctx.lineTo(x(i), y(v)) : ctx.moveTo(x(i), y(v))));
    ctx.stroke();
    let ema = losses[0];
    ctx.strokeStyle = "#e0584f";
    ctx.lineWidth = 2;
    ctx.beginPath();
    losses.forEach((v, i) => {
      ema = i ? 0.9 * ema + 0.1 * v : v;
      i ? ctx.lineTo(x(i), y(ema)) : ctx.moveTo(x(i), y(ema));
    });
    ctx.stroke();
  }
  ctx.fillStyle = "#ccc";
  ctx.font = "11px sans-serif";
  const last = losses.length ? losses[losses.length - 1].toFixed(4) : "-";
  ctx.fillText(`step ${data.step}/${data.total}  loss ${last}`, 14, top + CHART_HEIGHT - 4);
  ctx.restore();
}

app.registerExtension({
  name: "personalize.lossChart",
  async setup() {
    api.addEventListener("personalize.loss", ({ detail }) => {
      if (!detail || detail.node == null) return;
      const id = String(detail.node);
      const data = curves.get(id) ?? { losses: [], step: 0, total: detail.total };
      if (detail.start === 0) data.losses = [];
      data.losses.splice(detail.start, detail.losses.length, ...detail.losses);
      Object.assign(data, { step: detail.step, total: detail.total });
      curves.set(id, data);
      app.graph?.setDirtyCanvas(true, false);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!TRAINERS.has(nodeData?.name)) return;
    const onDraw = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDraw?.apply(this, arguments);
      const data = curves.get(String(this.id));
      if (!data || this.flags?.collapsed) return;
      if (this.size[1] < this.computeSize()[1] + CHART_HEIGHT + 10) {
        this.setSize([this.size[0], this.computeSize()[1] + CHART_HEIGHT + 10]);
      }
      drawChart(ctx, this, data);
    };
  },
});
