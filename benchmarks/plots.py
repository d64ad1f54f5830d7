"""The figures of docs/benchmarks.md, from the latest record in each ``benchmarks/results/*.json``.

    python benchmarks/plots.py          # writes docs/benchmarks/*.png
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "docs" / "benchmarks"
PHASES = [("read", "#8c6d31"), ("model", "#3182bd"), ("blend", "#e6550d"), ("normalise", "#fdae6b"),
          ("write", "#31a354"), ("donate", "#756bb1"), ("stage two", "#969696")]


def latest(name: str, **match) -> dict | None:
    """The newest record of ``results/{name}.json`` whose fields equal ``match``."""
    path = HERE / "results" / f"{name}.json"
    runs = json.loads(path.read_text()) if path.exists() else []
    runs = [r for r in runs if all(r.get(k) == v for k, v in match.items())]
    return runs[-1] if runs else None


def stage_time(monai: dict, cf12: dict | None) -> None:
    fig, axes = plt.subplots(1, 2 if cf12 else 1, figsize=(12 if cf12 else 7, 3.2), squeeze=False)
    ax = axes[0][0]
    phases = dict(monai["stage1_phases"])
    phases["stage two"] = monai["ours_stage2"]
    left = 0.0
    for name, colour in PHASES:
        value = phases.get(name, 0.0)
        ax.barh(1, value, left=left, color=colour, label=name)
        left += value
    ax.barh(0, monai["monai_model"], color=PHASES[1][1])
    ax.barh(0, monai["monai_best"] - monai["monai_model"], left=monai["monai_model"], color="#bdbdbd",
            label="MONAI outside the model")
    ax.set_yticks([0, 1], ["MONAI\nwhole volume", "chunkflow 2\ntwo stages"])
    ax.set_xlabel("seconds (best run)")
    ax.set_title(f"{'x'.join(map(str, monai['shape']))} U-Net ({monai['parameters'] / 1e6:.1f} M params), "
                 f"blocks {'x'.join(map(str, monai['block']))}", fontsize=9)
    ax.legend(fontsize=7, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.12))
    if cf12:
        ax = axes[0][1]
        ax.barh([1, 0], [cf12["ours_wall"], cf12["cf12_wall"]], color=[PHASES[1][1], "#d62728"])
        ax.set_yticks([0, 1], [f"chunkflow 1.2.0\n{cf12['cf12_patches']} patches",
                               f"chunkflow 2\n{cf12['ours_patches']} patches"])
        ax.set_xlabel("seconds (wall)")
        ax.set_title(f"same blocks, bump blend; max |error| vs reference: 1.2.0 {cf12['cf12_max_diff']:.1e}, "
                     f"ours {cf12['ours_max_diff']:.0e}", fontsize=9)
    fig.tight_layout()
    fig.savefig(OUT / "stage_time.png", dpi=120)
    plt.close(fig)


def overhead(monai: dict) -> None:
    model = monai["ours_model"]
    phases = dict(monai["stage1_phases"])
    phases["stage two"] = monai["ours_stage2"]
    names = [n for n, _ in PHASES if n != "model"]
    values = [100 * phases.get(n, 0.0) / model for n in names]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(names, values, color=[c for n, c in PHASES if n != "model"])
    ax.axhline(100 * (monai["monai_best"] - monai["monai_model"]) / monai["monai_model"], color="black", ls="--",
               lw=1, label="MONAI: all of its time outside the model")
    total = 100 * (monai["ours_best"] - model) / model
    ax.set_ylim(0, 1.4 * max(values + [100 * (monai["monai_best"] - monai["monai_model"]) / monai["monai_model"]]))
    ax.set_ylabel("% of the model's time")
    ax.set_title(f"chunkflow 2 outside the model: {total:.1f}% of the model's time in all (target <= 10%)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(OUT / "overhead.png", dpi=120)
    plt.close(fig)


def scaling(rec: dict) -> None:
    rows = rec["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    net = [r for r in rows if r["model"] != "identity"]
    ident = [r for r in rows if r["model"] == "identity"]
    for ax, data, title in ((axes[0], net, "demo U-Net (builtin:membrane): total seconds"),
                            (axes[1], ident, "identity model: seconds outside the model")):
        vox = [r["voxels"] for r in data]
        key = "ours" if data is net else None
        ours = [r["ours"] if key else r["ours"] - r["ours_model"] for r in data]
        monai = [r["monai"] if key else r["monai"] - r["monai_model"] for r in data]
        ax.loglog(vox, ours, "o-", label="chunkflow 2, two stages (with I/O)")
        ax.loglog(vox, monai, "s--", label="MONAI, whole volume in memory")
        ax.set_xlabel("voxels")
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "scaling.png", dpi=120)
    plt.close(fig)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    monai, cf12, scale = latest("vs_monai", batch=1), latest("vs_chunkflow12"), latest("scaling")
    if monai:
        stage_time(monai, cf12)
        overhead(monai)
    if scale:
        scaling(scale)
    print("\n".join(str(p) for p in sorted(OUT.glob("*.png"))))


if __name__ == "__main__":
    main()
