"""Render benchmark JSON lines (from stdin or files) as a Markdown table, for BENCHMARKS.md.

Run: ``python bench/report.py bench/out/latest.jsonl``.
"""

from __future__ import annotations

import fileinput
import json


def main() -> None:
    """Print one table row per measurement: bench, case, value, ceiling, ratio (and the paired median
    ratio of cases timed in turns with their ceiling)."""
    print("| bench | case | value | unit | ceiling | ratio | paired |")
    print("|---|---|---:|---|---:|---:|---:|")
    with fileinput.input() as lines:
        for raw in lines:
            line = raw.strip()
            if not line.startswith("{"):
                continue
            rec = json.loads(line)
            ceiling = "" if rec.get("ceiling") is None else f"{rec['ceiling']:g}"
            ratio = "" if rec.get("ratio") is None else f"{rec['ratio']:.2f}"
            paired = "" if rec.get("paired_ratio") is None else f"{rec['paired_ratio']:.2f}"
            cells = [rec["bench"], rec["case"], f"{rec['value']:g}", rec["unit"], ceiling, ratio, paired]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
