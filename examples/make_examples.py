"""Writes the example data the README's command lines use: a small synthetic outcome history the project
generates (``batchplan.core.history.synthetic_history``, never real data) and a 20-query queue from its test split,
which ``train`` does not see. Run from the checkout: ``uv run python examples/make_examples.py``."""

from __future__ import annotations

import json
from pathlib import Path

from batchplan.core.history import synthetic_history

HERE = Path(__file__).resolve().parent
QUEUE_ROWS = 20


def main() -> None:
    history = synthetic_history(400, 6, seed=12)
    target = HERE / "history"
    target.mkdir(exist_ok=True)
    history.queries.write_parquet(target / "queries.parquet")
    history.outcomes.write_parquet(target / "outcomes.parquet")
    history.prices.write_csv(target / "models.csv")
    queue = history.as_queue("test").head(QUEUE_ROWS)
    with (HERE / "queue.jsonl").open("w") as out:
        for row in queue.to_dicts():
            out.write(json.dumps(row) + "\n")
    print(f"wrote {target} ({history.queries.height} queries x {len(history.models)} models) and queue.jsonl")


if __name__ == "__main__":
    main()
