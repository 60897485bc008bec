"""Figures of the lens / attribution / ablation metrics (as step 11 writes them); each returns a matplotlib figure."""

from __future__ import annotations

from typing import Any

import numpy as np

MAX_UNIT_PANELS = 4


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _band(ax, x, estimates: list[dict], label: str, **kw) -> None:
    v = np.array([e["value"] for e in estimates], dtype=float)
    lo = np.array([e["ci"][0] for e in estimates], dtype=float)
    hi = np.array([e["ci"][1] for e in estimates], dtype=float)
    (line,) = ax.plot(x, v, marker="o", label=label, **kw)
    ax.fill_between(x, lo, hi, alpha=0.2, color=line.get_color())


def lens_kl(lens: dict[str, Any]):
    """KL(final ‖ lens) per residual entry, logit vs tuned lens (Belrose et al. 2023, Fig. 2 style)."""
    plt = _plt()
    labels = lens["labels"][:-1]  # the final entry is the model itself (KL 0)
    x = np.arange(len(labels))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    for ax, key, title in ((axes[0], "kl", "all real tokens"), (axes[1], "kl_scored", "scored positions")):
        _band(ax, x, lens["logit_lens"][key][:-1], "logit lens (held-out)")
        _band(ax, x, lens["tuned_lens"][key][:-1], "tuned lens (held-out)")
        if key == "kl":
            ax.plot(x, lens["tuned_lens"]["kl_train"][:-1], ls="--", color="tab:orange", label="tuned lens (train)")
            ax.plot(x, lens["logit_lens"]["kl_train"][:-1], ls=":", color="tab:blue", label="logit lens (train)")
        ax.set_xticks(x, labels, rotation=30 if len(labels) > 6 else 0)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set(title=f"KL(final ‖ lens), {title}", ylabel="nats", xlabel="residual entry")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    return fig


def lens_accuracy(lens: dict[str, Any]):
    """Top-1 accuracy on the target and its probability per residual entry, both lenses."""
    plt = _plt()
    labels = lens["labels"]
    x = np.arange(len(labels))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), layout="constrained")
    for ax, key, title in ((axes[0], "accuracy", "top-1 accuracy on the target"),
                           (axes[1], "target_prob", "probability of the target")):
        _band(ax, x, lens["logit_lens"][key], "logit lens")
        _band(ax, x, lens["tuned_lens"][key], "tuned lens")
        ax.set_xticks(x, labels, rotation=30 if len(labels) > 6 else 0)
        ax.set(title=f"{title} ({lens['scored_positions']} scored positions)", ylim=(-0.02, 1.02),
               xlabel="residual entry")
        ax.legend(fontsize=7)
    return fig


def _bars(ax, names: list[str], groups: dict[str, dict[str, dict]], title: str) -> None:
    width = 0.8 / max(1, len(groups))
    x = np.arange(len(names))
    for j, (label, ests) in enumerate(groups.items()):
        v = np.array([ests[n]["value"] for n in names])
        err = np.abs(np.array([ests[n]["ci"] for n in names]).T - v)
        ax.bar(x + (j - (len(groups) - 1) / 2) * width, v, width, yerr=err, capsize=2, label=label)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=7)
    ax.set(title=title, ylabel="direct logit attribution")
    ax.legend(fontsize=7)


def dla(dla_m: dict[str, Any]):
    """Per-component attribution (target vs random-token control), per position class, and the top units of the
    mixers that write the most."""
    plt = _plt()
    names = list(dla_m["components"])
    mixers = sorted((n for n in dla_m["top_units"]), key=lambda n: -abs(dla_m["components"][n]["value"]))
    mixers = mixers[:MAX_UNIT_PANELS]
    cols = 2 + len(mixers)
    fig, axes = plt.subplots(1, cols, figsize=(3.8 * cols, 3.8), layout="constrained")
    _bars(axes[0], names, {"target": dla_m["components"], "random token": dla_m["control"]},
          f"centred target logit ({dla_m['pairs']} positions)")
    by_class = {f"{c} (n={v['n']})": v["components"] for c, v in dla_m["by_class"].items()}
    _bars(axes[1], names, by_class or {"target": dla_m["components"]}, "by position class")
    for ax, name in zip(axes[2:], mixers):
        units = dla_m["top_units"][name]
        v = np.array([u["value"] for u in units])
        err = np.abs(np.array([u["ci"] for u in units]).T - v)
        ax.bar(np.arange(len(units)), v, yerr=err, capsize=2, color="tab:green")
        ax.set_xticks(np.arange(len(units)), [str(u["unit"]) for u in units])
        ax.set(title=f"{name}: top {dla_m['unit_kind']}s", xlabel=dla_m["unit_kind"])
        ax.axhline(0, color="grey", lw=0.8)
    return fig


def ablation(abl: dict[str, Any]):
    """Loss change (with CI) of every ablation target, one panel per ablation kind."""
    plt = _plt()
    kinds = list(abl["kinds"])
    first = abl["kinds"][kinds[0]]["effects"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 0.28 * len(first) + 1.6), squeeze=False,
                             layout="constrained")
    for ax, kind in zip(axes[0], kinds):
        effects = abl["kinds"][kind]["effects"]
        v = np.array([e["delta_loss"]["value"] for e in effects])
        err = np.abs(np.array([e["delta_loss"]["ci"] for e in effects]).T - v)
        y = np.arange(len(effects))
        ax.barh(y, v, xerr=err, capsize=2, color=["tab:red" if e["target"] == "all mixers" else "tab:blue"
                                                  for e in effects])
        ax.set_yticks(y, [e["target"] for e in effects], fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0, color="grey", lw=0.8)
        ax.set(title=f"{kind} ablation (clean loss {abl['kinds'][kind]['clean']['loss']:.3g})",
               xlabel="loss change (nats)")
        ax.set_xscale("symlog", linthresh=1e-3)
    return fig


def diagnostics_figures(metrics: dict[str, Any]) -> dict[str, Any]:
    """Step 11's figures by file name."""
    return {"lens_kl": lens_kl(metrics["lens"]), "lens_accuracy": lens_accuracy(metrics["lens"]),
            "dla": dla(metrics["dla"]), "ablation": ablation(metrics["ablation"])}
