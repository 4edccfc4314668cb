// The node an execution id names (no ComfyUI imports, so it can be checked outside the browser): "12:5" is node 5
// inside the subgraph of node 12 in the root graph. ComfyUI's frontend resolves ids the same way
// (graphTraversalUtil.getNodeByExecutionId) but does not export it to extensions.
export function nodeForExecutionId(rootGraph, executionId) {
  const path = String(executionId ?? "").split(":").filter(Boolean);
  if (!rootGraph || !path.length) return null;
  let graph = rootGraph;
  for (const id of path.slice(0, -1)) {
    graph = graph.getNodeById(id)?.subgraph; // a subgraph instance holds its inner graph
    if (!graph) return null;
  }
  return graph.getNodeById(path[path.length - 1]) ?? null;
}
