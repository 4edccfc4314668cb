// A seed on a Personalize node starts "fixed", not the frontend's "randomize" for any INT named seed: a new seed
// after every run would pick another identifier word, retrain from scratch and miss every cache. The control widget
// itself stays (saved workflows keep their widget values in place); a saved workflow's own choice is restored after
// this, when the frontend configures the node, and the user can still pick randomize.
import { app } from "../../../scripts/app.js"; // served at /extensions/<pack>/js/

app.registerExtension({
  name: "personalize.seedControl",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("Personalize")) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      for (const widget of this.widgets ?? []) {
        if (widget.name === "control_after_generate" && widget.value === "randomize") widget.value = "fixed";
      }
      return result;
    };
  },
});
