"""One table of finished pretraining runs from MLflow: ``val/objective``, its terms and zero-shot R@1.

``python jobs/compare_runs.py --config FILE [key=value ...] -- RUN_NAME [RUN_NAME ...]`` (the config names
the tracking URI and experiment: mlflow.*). The last logged value of each metric; ``-`` where a run has
no such term (a unimodal phase validates on its own kind only). Used by scripts/two_phase_demo.sh.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import parse_cli  # noqa: E402

COLUMNS = {
    "step": "step",
    "val/objective": "objective",
    "val/term/mlm": "mlm term",
    "val/term/mim": "mim term",
    "val/term/dino": "dino term",
    "val/term/retrieval": "retrieval term",
    "val/retrieval/i2t_r1": "R@1 i2t",
    "val/retrieval/t2i_r1": "R@1 t2i",
}


def table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown: one row per run, the COLUMNS present in any run."""
    shown = [k for k in COLUMNS if any(k in metrics for metrics in rows.values())]
    lines = ["| run | " + " | ".join(COLUMNS[k] for k in shown) + " |", "|---" * (len(shown) + 1) + "|"]
    for name, metrics in rows.items():
        cells = [
            f"{metrics[k]:.0f}"
            if k == "step" and k in metrics
            else f"{metrics[k]:.4f}"
            if k in metrics
            else "-"
            for k in shown
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_metrics(tracking_uri: str, experiment: str, run_names: list[str]) -> dict[str, dict[str, float]]:
    """The latest MLflow run of each name: its metrics' last values, plus the last step trained."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"compare_runs: no experiment {experiment!r} at {tracking_uri}")
    rows = {}
    for name in run_names:
        runs = client.search_runs(
            [found.experiment_id],
            f"attributes.run_name = '{name}'",
            order_by=["start_time DESC"],
            max_results=1,
        )
        if not runs:
            raise SystemExit(f"compare_runs: no run named {name!r} in experiment {experiment!r}")
        metrics = dict(runs[0].data.metrics)
        history = client.get_metric_history(runs[0].info.run_id, "val/objective")
        if history:
            metrics["step"] = float(max(m.step for m in history))
        rows[name] = metrics
    return rows


def main(argv: list[str] | None = None) -> int:
    config, args = parse_cli(
        argv, __doc__, lambda p: p.add_argument("--runs", nargs="+", required=True, help="run names")
    )
    from pipeline.paths import TRAINING, absolute_paths

    config = absolute_paths(config, TRAINING)
    print(table(run_metrics(config.mlflow.tracking_uri, config.mlflow.experiment, args.runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
