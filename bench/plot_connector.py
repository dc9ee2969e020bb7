"""Draw TTFT against prompt length from ``bench/connector.py``'s JSON lines (needs matplotlib: the
``bench`` extra).

Run: ``python bench/plot_connector.py bench/out/connector.jsonl docs/bench-connector-ttft.png``.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

LABELS = {
    "recompute": "recompute (no cache)",
    "vllm_hit": "vLLM's own prefix cache",
    "embedded_host": "kvstrata embedded, host tier",
    "embedded_disk": "kvstrata embedded, disk tier (page cache dropped)",
    "shm_server": "kvstrata server, kvs+shm://",
    "tcp_server": "kvstrata server, kvs://",
    "example_connector": "vLLM ExampleConnector",
}


def main(source: str, target: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(source, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            case = record.get("case", "")
            if record.get("bench") != "connector" or not case.startswith("ttft_"):
                continue
            _, length, name = case.split("_", 2)
            series[name].append((int(length), float(record["value"])))
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for name, label in LABELS.items():
        points = sorted(series.get(name, []))
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("time to first token (s)")
    ax.set_title("TTFT on vLLM's CPU engine (random Llama, 8 layers, hidden 1024, fp32)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(target)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
