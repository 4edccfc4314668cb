"""Writing a benchmark's table and JSON lines to --out, atomically (shared by the bench scripts)."""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_results(path: str | os.PathLike, table: str, rows: list[dict]) -> None:
    out = Path(path)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(table + "\n\n" + "\n".join(json.dumps(r) for r in rows) + "\n")
    os.replace(tmp, out)
