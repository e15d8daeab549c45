"""The per-token routing heat map (tokens x adapters) as a PNG, drawn with matplotlib's Agg backend."""

from __future__ import annotations

from pathlib import Path


def _label(token: str) -> str:
    text = token.replace("\n", "\\n").replace("\t", "\\t")
    if text.startswith(" "):
        text = "\u2423" + text[1:]  # a visible space: where a word starts
    return text if len(text) <= 14 else text[:13] + "\u2026"


def routing_heatmap(trace: dict, names: list[str], path: Path, *, title: str, top_k: int | None = None) -> Path:
    """Adapters as rows, tokens as columns (prompt, then the greedy continuation), cell = router probability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    probs = np.asarray(trace["probs"], dtype=float).T  # [N, T]
    n, t = probs.shape
    fig_w = min(max(6.0, 0.36 * t + 2.2), 30.0)
    fig, ax = plt.subplots(figsize=(fig_w, 1.0 + 0.55 * n + 1.3), dpi=130)
    im = ax.imshow(probs, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_yticks(range(n), labels=names)
    ax.set_xticks(range(t), labels=[_label(tok) for tok in trace["tokens"]], rotation=90, fontsize=7,
                  fontfamily="monospace")
    boundary = trace["prompt_tokens"] - 0.5
    generated = boundary < t - 0.5
    if generated:
        ax.axvline(boundary, color="white", linewidth=2.0, linestyle="--")
    if t <= 60:
        for j in range(t):
            for i in range(n):
                value = probs[i, j]
                ax.text(j, i, f"{value:.2f}"[1:] if value < 1 else "1", ha="center", va="center", fontsize=5.5,
                        color="black" if value > 0.6 else "white")
    cbar = fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
    cbar.set_label("router probability", fontsize=8)
    sub = f" (top-{top_k} of these are applied per token)" if top_k else ""
    note = "; dashed line: prompt | greedy continuation (KV cache)" if generated else ""
    ax.set_title(f"{title}{sub}{note}", fontsize=9, loc="left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
