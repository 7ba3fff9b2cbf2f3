"""The markdown table of an online run (trainer=online): each method's score on the stream's new
tasks after k updates, first and last quarter, cumulative loss and regret.

Usage: python scripts/online_table.py outputs/<run>/results.json [more results.json ...]
"""

import json
import sys
from pathlib import Path

from metalearn.records.online import format_online_table


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for path in sys.argv[1:]:
        results = json.loads(Path(path).read_text())
        if results.get("trainer") != "online":
            sys.exit(f"error: {path} is not an online run's results.json (trainer=online)")
        print(format_online_table(results))
        train = results["train"]
        print(
            f"\n{train['rounds']} rounds, {train['meta_steps']} meta-steps, "
            f"{train['wall_seconds'] / 60:.1f} min on {results['hardware'].get('cpu', '?')} "
            f"({path})\n"
        )


if __name__ == "__main__":
    main()
