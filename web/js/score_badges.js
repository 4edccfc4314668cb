// Score badges on ImageReward Score: every image of the last run as a thumbnail with its reward and its rank in
// the batch (#1 = best), the badge coloured from red (worst of the batch) to green (best). The server sends the
// thumbnails and scores in the node's "personalize_scores" UI output; they are drawn in a widget, so the node
// layout reserves the space.
import { app } from "../../../scripts/app.js"; // served at /extensions/<pack>/js/
import { api } from "../../../scripts/api.js";

const NODE = "PersonalizeImageRewardScore";
const CELL = 84; // thumbnail cell, px
const GAP = 4;
const MIN_ROWS_HEIGHT = 24; // the hint line before the first run

function badgeColor(score, lo, hi) {
  const t = hi > lo ? (score - lo) / (hi - lo) : 1;
  return `hsl(${Math.round(120 * t)}, 65%, 38%)`; // red -> green across this batch
}

function thumbnail(badge) {
  const query = new URLSearchParams({ filename: badge.filename, subfolder: badge.subfolder ?? "",
    type: badge.type ?? "temp", rand: Math.random() }); // as ComfyUI's previews: never a cached older image
  const img = new Image();
  img.onload = () => app.canvas?.setDirty(true, false);
  img.src = api.apiURL(`/view?${query}`);
  return img;
}

function layout(count, width) {
  const columns = Math.max(1, Math.floor((width - 20 + GAP) / (CELL + GAP)));
  return { columns, rows: Math.ceil(count / columns) };
}

function drawBadges(ctx, state, width, y) {
  ctx.save();
  ctx.font = "11px sans-serif";
  ctx.textBaseline = "middle";
  if (!state?.badges?.length) {
    ctx.fillStyle = "#999";
    ctx.fillText("score badges: appear after a run", 14, y + MIN_ROWS_HEIGHT / 2);
    ctx.restore();
    return;
  }
  const scores = state.badges.map((b) => b.score);
  const lo = Math.min(...scores);
  const hi = Math.max(...scores);
  const { columns } = layout(state.badges.length, width);
  state.badges.forEach((badge, i) => {
    const x = 10 + (i % columns) * (CELL + GAP);
    const top = y + Math.floor(i / columns) * (CELL + GAP);
    ctx.fillStyle = "#1b1b1b";
    ctx.fillRect(x, top, CELL, CELL);
    const img = state.images[i];
    if (img?.complete && img.naturalWidth) {
      const scale = Math.min(CELL / img.naturalWidth, CELL / img.naturalHeight);
      const w = img.naturalWidth * scale;
      const h = img.naturalHeight * scale;
      ctx.drawImage(img, x + (CELL - w) / 2, top + (CELL - h) / 2, w, h);
    }
    const label = `#${badge.rank}  ${badge.score >= 0 ? "+" : ""}${badge.score.toFixed(3)}`;
    ctx.fillStyle = badgeColor(badge.score, lo, hi);
    ctx.fillRect(x, top + CELL - 16, CELL, 16);
    ctx.fillStyle = "#fff";
    ctx.fillText(label, x + 4, top + CELL - 8);
    if (badge.rank === 1) {
      ctx.strokeStyle = "#f2c94c";
      ctx.lineWidth = 2;
      ctx.strokeRect(x + 1, top + 1, CELL - 2, CELL - 2);
    }
  });
  ctx.restore();
}

app.registerExtension({
  name: "personalize.scoreBadges",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const node = this;
      node.personalizeScores = { badges: [], images: [] };
      this.addCustomWidget({
        name: "score_badges",
        type: "personalize.score_badges",
        serialize: false, // display only: never part of the saved workflow's widget values
        options: { serialize: false },
        computeSize(width = node.size[0]) { // the frontend passes no width, or the node's minimum one
          const count = node.personalizeScores.badges.length;
          if (!count) return [width, MIN_ROWS_HEIGHT];
          // rows as drawn: at the node's own width (a wider node needs fewer)
          return [width, layout(count, Math.max(width, node.size[0])).rows * (CELL + GAP)];
        },
        draw(ctx, _node, width, y) {
          drawBadges(ctx, node.personalizeScores, width, y);
        },
      });
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      const result = onExecuted?.apply(this, arguments);
      const badges = (output?.personalize_scores ?? []).filter((b) => Number.isFinite(b?.score));
      this.personalizeScores = { badges, images: badges.map(thumbnail) };
      const size = this.computeSize();
      this.setSize([Math.max(this.size[0], size[0]), size[1]]);
      app.canvas?.setDirty(true, true);
      return result;
    };
  },
});
