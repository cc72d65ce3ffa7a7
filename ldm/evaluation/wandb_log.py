"""With ``logger=wandb``: the sweep's table and plot, and the reconstruction numbers, in W&B.

Offline when ``logger.offline=true`` or ``WANDB_MODE=offline`` (the same rule as training's
loggers): the run is recorded under the evaluation's directory for a later ``wandb sync``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldm.evaluation.results import sweep_table
from ldm.runs import wandb_offline_requested


def log_to_wandb(
    logger_cfg: dict[str, Any], out_dir: Path, results: dict[str, Any], plot_path: Path | None
) -> None:
    """One W&B run holding what ``results.md`` shows; its config is the results' settings."""
    import wandb  # here, not at module level: evaluating with logger=none needs no wandb

    run = wandb.init(
        project=logger_cfg.get("project") or "ldm-coco",
        entity=logger_cfg.get("entity"),
        name=logger_cfg.get("name") or f"eval/{out_dir.name}",
        tags=[*(logger_cfg.get("tags") or []), "evaluation"],
        dir=str(out_dir),
        mode="offline" if wandb_offline_requested(logger_cfg) else None,  # None: WANDB_MODE
        id=logger_cfg.get("id"),
        resume="allow" if logger_cfg.get("id") else None,
        config={"metrics": results["metrics"], **results["settings"]},
    )
    logged: dict[str, Any] = {}
    if results["sweep"]:
        headers, rows = sweep_table(results["sweep"])
        logged["evaluation/sweep"] = wandb.Table(columns=headers, data=rows)
    if plot_path is not None:
        logged["evaluation/sweep_plot"] = wandb.Image(str(plot_path))
    if logged:
        run.log(logged)
    if results["reconstruction"] is not None:
        run.summary.update(
            {
                f"reconstruction/{name}": value
                for name, value in results["reconstruction"].items()
                if isinstance(value, int | float)
            }
        )
    run.finish()
