"""Evaluation output: ``results.json``, ``results.md`` (a table per metric set and per prompt group), a side-by-side
grid of the first prompts (``grids/side_by_side.png``: one row per evaluated row, same prompts and latents in each
column), and plots: each metric against the step count per model (the teacher as a dashed line) and quality against
images/s (``plots/*.png``)."""
from __future__ import annotations

import json
import os
from typing import Sequence


LOWER_IS_BETTER = {"fid"}
GRID_COLUMNS = 8


def format_table(results: dict) -> str:
    """The markdown table of ``results`` (rows x metrics, then one table per metric by prompt group)."""
    metrics = list(dict.fromkeys(m for r in results["rows"] for m in r["metrics"]))
    fmt = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    head = ["row", "sampler", "steps", "guidance", "img/s"] + [m + (" (lower better)" if m in LOWER_IS_BETTER else "")
                                                                for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["rows"]:
        cells = [r["name"], r["sampler"], r["steps"], r["guidance"], r["images_per_s"]]
        lines.append("| " + " | ".join(fmt(c) for c in cells + [r["metrics"].get(m) for m in metrics]) + " |")
    for m in metrics:
        groups = [g for g in results["groups"] if any(g in r["by_group"].get(m, {}) for r in results["rows"])]
        if groups:
            lines += ["", f"{m} by prompt group:", "", "| row | " + " | ".join(groups) + " | mean |",
                      "|" + "---|" * (len(groups) + 2)]
            lines += ["| " + " | ".join([r["name"]] + [fmt(r["by_group"][m][g]) for g in groups]
                                        + [fmt(r["metrics"][m])]) + " |" for r in results["rows"]]
    return "\n".join(lines)


def write(results: dict, images: dict, rows: Sequence, prompts: Sequence, out_dir: str) -> None:
    """Write the results files, the grid (``images``: row name -> its first uint8 images) and the plots."""
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(f"# Evaluation: {results['prompts']} prompts, seed {results['seed']}\n\n{format_table(results)}\n")
    _grid(images, rows, prompts, os.path.join(out_dir, "grids", "side_by_side.png"))
    _plots(results, os.path.join(out_dir, "plots"))


def _figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _grid(images: dict, rows: Sequence, prompts: Sequence, path: str) -> None:
    plt = _figure()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cols = min(GRID_COLUMNS, len(prompts))
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.6 * cols + 1.5, 1.6 * len(rows) + 0.6), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(images[row.name][c])
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(row.name, fontsize=7)
            if r == 0:
                ax.set_title(prompts[c].text[:40], fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plots(results: dict, folder: str) -> None:
    plt = _figure()
    os.makedirs(folder, exist_ok=True)
    rows = results["rows"]
    metrics = list(dict.fromkeys(m for r in rows for m in r["metrics"]))
    models = list(dict.fromkeys(r["model"] for r in rows if r["sampler"] == "lcm"))
    for m in metrics:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for model in models:
            pts = sorted((r["steps"], r["metrics"][m]) for r in rows if r["model"] == model and m in r["metrics"])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=model)
        for r in rows:
            if r["sampler"] == "ddim" and m in r["metrics"]:
                ax.axhline(r["metrics"][m], linestyle="--", color="gray", label=r["name"])
        ax.set_xticks(sorted({r["steps"] for r in rows if r["sampler"] == "lcm"}))
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(m + (" (lower is better)" if m in LOWER_IS_BETTER else ""))
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(folder, f"{m.replace('.', '_')}_vs_steps.png"), dpi=120)
        plt.close(fig)
        timed = [r for r in rows if r["images_per_s"] and m in r["metrics"]]
        if timed:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for r in timed:
                ax.scatter(r["images_per_s"], r["metrics"][m])
                ax.annotate(r["name"], (r["images_per_s"], r["metrics"][m]), fontsize=6)
            ax.set_xscale("log")
            ax.set_xlabel("images/s (generation, this machine)")
            ax.set_ylabel(m)
            fig.tight_layout()
            fig.savefig(os.path.join(folder, f"{m.replace('.', '_')}_vs_speed.png"), dpi=120)
            plt.close(fig)
