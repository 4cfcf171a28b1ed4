"""The paper's Figure 3 panels from a run's metrics.jsonl: sparsity (L0) per layer over
training, the L0 coefficient schedule, dead features per layer, and explained variance."""

from __future__ import annotations

from pathlib import Path

from clt_forge.errors import CLTError
from clt_forge.training.metrics import read_metrics


def draw_plots(run: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics_path = run / "metrics.jsonl"
    if not metrics_path.is_file():
        raise CLTError(f"no metrics.jsonl in {run}: is it a `clt train` run folder?")
    records = read_metrics(metrics_path)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    if not train:
        raise CLTError(f"{metrics_path} has no training steps yet.")
    out = run / "plots"
    out.mkdir(exist_ok=True)
    written = []

    def save(fig: object, name: str) -> None:
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")  # type: ignore[attr-defined]
        plt.close(fig)  # type: ignore[arg-type]
        written.append(path)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in train], [r["l0_coefficient"] for r in train])
    ax.set(xlabel="step", ylabel="L0 coefficient (lambda0)", title="Sparsity coefficient schedule")
    save(fig, "l0_coefficient")

    if evals:
        steps = [r["step"] for r in evals]
        n_layers = len(evals[0]["l0"])
        cmap = plt.get_cmap("viridis")
        for key, label, name in (
            ("l0", "L0 (active features per token)", "l0_per_layer"),
            ("dead_features", "dead features", "dead_per_layer"),
            ("explained_variance", "explained variance (held-out)", "explained_variance"),
        ):
            fig, ax = plt.subplots(figsize=(6, 3.5))
            for layer in range(n_layers):
                ax.plot(steps, [r[key][layer] for r in evals], color=cmap(layer / max(1, n_layers - 1)), lw=1)
            ax.set(xlabel="step", ylabel=label, title=f"{label} per layer (dark: first layer)")
            if key == "l0":
                ax.set_yscale("log")
            save(fig, name)
    return written
