"""The pictures of the Admin tab: a run's training curves and the versions' ratings over time.

Owns: matplotlib figures (Agg backend), built from plain lists so they can be tested alone.
"""

from __future__ import annotations

from typing import Any


def training_curve(history: list[dict[str, Any]], title: str):
    """A matplotlib figure of loss and reward margin per training step (PPO/RLOO: mean reward, KL
    and entropy, and with their reward terms the shaped reward, relevance, register and document
    likelihood (from its start); DPO with thumbs or NLL: also the parts of the loss, since the
    held-out loss is the pairs' alone), and the held-out loss on the steps it was scored (the checkpoint selection's curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 2.8))
    steps = [h["step"] for h in history]
    for key, label in (("loss", "loss"), ("pairs_loss", "pairs' loss"), ("thumbs_loss", "thumbs' loss"),
                       ("nll", "chosen NLL"), ("reward_margin", "reward margin"), ("mean_reward", "mean reward"),
                       ("kl", "KL"), ("entropy", "entropy"), ("mean_shaped_reward", "shaped reward"),
                       ("mean_relevance", "relevance"), ("mean_register", "register")):
        if history and key in history[0]:
            ax.plot(steps, [h[key] for h in history], marker="." if len(steps) < 30 else None, label=label)
    if history and history[0].get("document_floor") is not None:  # a log-likelihood (~ -2.5): shown from its start
        ax.plot(steps, [h["mean_document"] - h["document_floor"] for h in history],
                marker="." if len(steps) < 30 else None, label="document likelihood vs start")
    scored = [h for h in history if isinstance(h.get("held_out_score"), (int, float))]
    if scored:
        ax.plot([h["step"] for h in scored], [h["held_out_score"] for h in scored], marker="o", linestyle="--",
                label="held-out loss")
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if history:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    plt.close(fig)
    return fig


def ratings_plot(points: list[tuple[Any, dict[str, float]]]):
    """Ratings of adapter versions (Elo scale) as the A/B votes came in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 2.8))
    versions = sorted({v for _, r in points for v in r})
    for v in versions:
        xs = [t for t, r in points if v in r]
        ax.plot(xs, [r[v] for t, r in points if v in r], marker=".", label=v)
    ax.set_ylabel("rating (Elo scale)")
    ax.set_title("Adapter ratings from A/B votes over time" if points else "no A/B votes between versions yet",
                 fontsize=10)
    ax.grid(alpha=0.3)
    if versions:
        ax.legend(loc="best", fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    plt.close(fig)
    return fig


GATE_COLOURS = {"promoted": "tab:green", "overridden": "tab:olive", "staged": "tab:blue", "rejected": "tab:red",
                "failed": "tab:red"}


def liked_plot(rows: list[dict[str, Any]]):
    """The liked share of each version in serving order, with its 95 % interval; versions the
    gate rejected (never served) are marked where they would have stood."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 2.8))
    xs = list(range(len(rows)))
    for x, r in zip(xs, rows):
        colour = GATE_COLOURS.get(r["gate"], "tab:gray")
        if r["liked_pct"] is not None:
            ax.errorbar([x], [r["liked_pct"]], yerr=[[r["liked_pct"] - r["low_pct"]], [r["high_pct"] - r["liked_pct"]]],
                        fmt="o", color=colour, capsize=4)
            ax.annotate(f"{r['thumbs']} thumbs", (x, r["liked_pct"]),
                        textcoords="offset points", xytext=(6, -3), fontsize=7)
        else:
            ax.text(x, 50, r["gate"], ha="center", va="center", fontsize=8, color=colour, rotation=90)
    served = [(x, r["liked_pct"]) for x, r in zip(xs, rows) if r["liked_pct"] is not None]
    if len(served) > 1:
        ax.plot(*zip(*served), color="tab:gray", alpha=0.4, linewidth=1)
    ax.set_xticks(xs, [r["version"] for r in rows])
    ax.set_ylim(0, 100)
    ax.set_ylabel("liked %")
    ax.set_title("Liked share of each served version (95% interval); colour: the gate's verdict"
                 if served else "no thumbs on any version yet", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    plt.close(fig)
    return fig
