"""The loss chart finds the trainer an event names (web/js/execution_node.js), run in QuickJS: a node inside a
subgraph must get its own curve, never the root-graph node that has the same local id."""
import re
from pathlib import Path

import pytest

quickjs = pytest.importorskip("quickjs")  # in requirements-dev.txt: CI runs this
SOURCE = Path(__file__).resolve().parents[2] / "web" / "js" / "execution_node.js"

# root: node 5 (a trainer), node 12 (a subgraph instance whose inner graph has its own node 5), node 7 (plain)
GRAPHS = """
function graph(nodes) { return { getNodeById: (id) => nodes[id] ?? null }; }
const inner = graph({ 5: { name: "inner 5" } });
const root = graph({ 5: { name: "root 5" }, 12: { name: "instance 12", subgraph: inner }, 7: { name: "plain 7" } });
function found(id) { const node = nodeForExecutionId(root, id); return node ? node.name : null; }
"""


@pytest.fixture(scope="module")
def found():
    context = quickjs.Context()
    context.eval(re.sub(r"^export ", "", SOURCE.read_text(), flags=re.M))  # an ES module, evaluated as a script
    context.eval(GRAPHS)
    return context.get("found")


@pytest.mark.parametrize("execution_id, name", [
    ("5", "root 5"), (5, "root 5"), ("12:5", "inner 5"), ("12", "instance 12"),
    ("7:5", None),  # node 7 holds no subgraph
    ("12:9", None), ("99", None), ("", None),
])
def test_an_execution_id_names_the_node_of_its_own_graph(found, execution_id, name):
    assert found(execution_id) == name
