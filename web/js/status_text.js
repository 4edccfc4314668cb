// Status text on Personalize nodes: what a node reports after it runs (saved file names, ImageReward's summary and
// notes, Rank by Reward's kept images, ...). The nodes send it as the "text" UI output, which the ComfyUI frontend
// shows only on its own Preview Any node; here it is drawn under the node's widgets, first lines first.
import { app } from "../../../scripts/app.js"; // served at /extensions/<pack>/js/
import { api } from "../../../scripts/api.js";
import { nodeForExecutionId } from "./execution_node.js";

const LINE = 14;
const MAX_LINES = 8;

function fit(ctx, text, width) {
  if (ctx.measureText(text).width <= width) return text;
  let cut = text.length;
  while (cut > 1 && ctx.measureText(`${text.slice(0, cut)}…`).width > width) cut -= 1;
  return `${text.slice(0, cut)}…`;
}

function drawStatus(ctx, lines, width, y) {
  ctx.save();
  ctx.font = "11px monospace";
  ctx.textBaseline = "middle";
  const shown = lines.length > MAX_LINES ? [...lines.slice(0, MAX_LINES - 1),
    `… ${lines.length - MAX_LINES + 1} more lines (full text in the summary output / the log)`] : lines;
  shown.forEach((line, i) => {
    ctx.fillStyle = line.startsWith("note:") ? "#e0b84f" : "#bbb";
    ctx.fillText(fit(ctx, line, width - 20), 10, y + i * LINE + LINE / 2);
  });
  ctx.restore();
}

function showStatus(node, lines) {
  node.personalizeStatus = lines;
  if (lines.length && !node.widgets?.some((w) => w.name === "personalize_status")) {
    node.addCustomWidget({
      name: "personalize_status",
      type: "personalize.status",
      serialize: false, // display only: never part of the saved workflow's widget values
      options: { serialize: false },
      computeSize: (width = node.size[0]) =>
        [width, Math.min(node.personalizeStatus?.length ?? 0, MAX_LINES) * LINE + 4],
      draw(ctx, _node, width, y) {
        drawStatus(ctx, node.personalizeStatus ?? [], width, y);
      },
    });
  }
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0]), size[1]]);
  app.canvas?.setDirty(true, true);
}

app.registerExtension({
  name: "personalize.statusText",
  async setup() {
    // A node about to run loses its old text: ComfyUI sends "executed" only for a node with UI output, so a note
    // of an earlier run would otherwise stay on a node that now runs without one. Nodes the run takes from the
    // cache never get "executing" (nor, unless they are output nodes, "executed"): they keep their text.
    api.addEventListener("executing", ({ detail }) => {
      const id = typeof detail === "object" && detail !== null ? detail.node : detail;
      if (id == null) return;
      const node = nodeForExecutionId(app.graph, id);
      if (node?.personalizeStatus?.length) showStatus(node, []);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("Personalize")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      const result = onExecuted?.apply(this, arguments);
      const text = Array.isArray(output?.text) ? output.text : [];
      const lines = text.join("\n").split("\n").filter((line) => line.trim());
      if (lines.length || this.personalizeStatus?.length) showStatus(this, lines);
      return result;
    };
  },
});
