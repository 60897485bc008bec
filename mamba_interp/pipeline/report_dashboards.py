"""Feature dashboard cards as self-contained HTML (inline CSS and SVG, no script, nothing fetched).

Renders the JSON-able cards of ``mamba_interp.sparse_autoencoder.dashboard`` (what pipeline step 3 writes to
``feature_dashboards.json``): per latent its reasons for being shown, density, matched variable, measured ablation
effect, the activation histogram, the top-activating contexts with each token shaded by the activation (the
framed token is where the context's activation is taken), and the logit effect. Pure Python, so building the
report imports no numerical library. In a notebook: ``IPython.display.HTML(dashboards_html(cards))``.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

CSS = """
.dash-grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:10px;margin:8px 0}
.dash-card{border:1px solid #dfe3ea;border-radius:6px;padding:8px 10px;background:#fcfcfd;font-size:.84em;
min-width:0}
.dash-card h4{margin:0 0 4px;font-size:1em}
.dash-tag{display:inline-block;background:#eef2fb;border-radius:8px;padding:0 6px;margin:1px 3px 1px 0;
font-size:.92em}
.dash-ctx{font-family:ui-monospace,Menlo,monospace;white-space:nowrap;overflow-x:auto;margin:1px 0;
line-height:1.6}
.dash-tok{padding:0 2px;margin-right:1px;border-radius:2px;white-space:pre}
.dash-focus{outline:1.5px solid #c0392b}
.dash-val{color:#5d6778;display:inline-block;min-width:4.2em}
.dash-logits{border-collapse:collapse;width:100%;font-size:.95em}
.dash-logits td{padding:0 4px;border:0;font-family:ui-monospace,Menlo,monospace;white-space:pre}
.dash-up{color:#1f7a3a}.dash-down{color:#b03a2e}
"""


def _histogram_svg(hist: dict, width: int = 300, height: int = 56) -> str:
    counts, edges = hist.get("counts") or [], hist.get("edges") or []
    if not counts:
        return '<p class="meta">never fires on these tokens</p>'
    top = max(counts) or 1
    bar = width / len(counts)
    rects = "".join(
        f'<rect x="{i * bar:.1f}" y="{height - 12 - (height - 14) * c / top:.1f}" width="{max(bar - 1, 1):.1f}" '
        f'height="{(height - 14) * c / top:.1f}" fill="#e67e22"><title>{edges[i]:.3g}–{edges[i + 1]:.3g}: {c}'
        f"</title></rect>" for i, c in enumerate(counts))
    labels = (f'<text x="0" y="{height - 1}" font-size="9">{edges[0]:.3g}</text>'
              f'<text x="{width}" y="{height - 1}" font-size="9" text-anchor="end">{edges[-1]:.3g}</text>')
    return (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="activation histogram">{rects}{labels}</svg>')


def _context_html(ctx: dict, scale: float) -> str:
    e = html.escape
    spans = []
    for i, (tok, act) in enumerate(zip(ctx["tokens"], ctx["acts"])):
        alpha = min(1.0, max(0.0, act / scale)) if scale > 0 else 0.0
        cls = "dash-tok dash-focus" if i == ctx["focus"] else "dash-tok"
        spans.append(f'<span class="{cls}" style="background:rgba(230,126,34,{alpha:.2f})" '
                     f'title="activation {act:.4g}">{e(tok) or "&nbsp;"}</span>')
    where = f"seq {ctx['sequence']} pos {ctx['position']}"
    return (f'<div class="dash-ctx" title="{e(where)}"><span class="dash-val">{ctx["activation"]:.3g}</span>'
            + "".join(spans) + "</div>")


def _logits_html(effect: dict | None) -> str:
    if not effect:
        return ""
    e = html.escape
    up, down = effect.get("promoted") or [], effect.get("suppressed") or []
    rows = []
    for i in range(max(len(up), len(down))):
        a = (f'<td class="dash-up">{e(repr(up[i][0])[1:-1])}</td><td>{up[i][1]:+.3g}</td>' if i < len(up)
             else "<td></td>" * 2)
        b = (f'<td class="dash-down">{e(repr(down[i][0])[1:-1])}</td><td>{down[i][1]:+.3g}</td>' if i < len(down)
             else "<td></td>" * 2)
        rows.append(f"<tr>{a}{b}</tr>")
    return (f'<p class="meta">logit effect ({e(effect.get("note", effect.get("kind", "")))}): promoted | '
            f'suppressed</p><table class="dash-logits">{"".join(rows)}</table>')


def card_html(card: dict) -> str:
    """One latent's card."""
    e = html.escape
    tags = "".join(f'<span class="dash-tag">{e(r)}</span>' for r in card.get("reasons") or [])
    var = card.get("variable")
    var_line = (f'<p>matched variable: <b>{e(var["name"])}</b>, r = {var["r"]:.2f} (|r| with it shuffled: '
                f'{var["shuffled_best_abs_r"]:.2f})</p>' if var else "<p class=\"meta\">no ground-truth variable</p>")
    ablation = card.get("ablation")
    abl_line = ""
    if ablation:
        lo, hi = ablation["ci"]
        abl_line = (f"<p>zero-ablating it changes the target loss by {ablation['value']:+.4f} nats "
                    f"[95% CI {lo:+.4f}, {hi:+.4f}] over {ablation['n']} held-out sequences</p>")
    scale = card.get("max_activation") or 0.0
    contexts = "".join(_context_html(c, scale) for c in card.get("contexts") or [])
    return (
        f'<div class="dash-card" data-latent="{card["latent"]}"><h4>{e(str(card.get("sae", "")))} · latent '
        f'{card["latent"]}</h4><div>{tags}</div>'
        f'<p class="meta">fires on {100 * card["density"]:.2f}% of held-out tokens; max {card["max_activation"]:.3g}, '
        f'mean when firing {card["mean_activation"]:.3g}</p>{var_line}{abl_line}'
        f"{_histogram_svg(card.get('histogram') or {})}"
        f'<p class="meta">top-activating contexts (value, then the tokens before and after; the framed token is '
        f"where it fires)</p>{contexts or '<p class=meta>no context</p>'}{_logits_html(card.get('logit_effect'))}"
        "</div>"
    )


def dashboards_html(cards: Sequence[dict], group_by: str = "sae") -> str:
    """All cards, grouped (one collapsible block per SAE), with their CSS; self-contained."""
    e = html.escape
    groups: dict[str, list[dict]] = {}
    for card in cards:
        groups.setdefault(str(card.get(group_by, "")), []).append(card)
    parts = [f"<style>{CSS}</style>"]
    for i, (name, members) in enumerate(groups.items()):
        hook = members[0].get("hook_name", "")
        parts.append(f'<details class="dashboards"{" open" if i == 0 else ""}><summary><b>{e(name)}</b> '
                     f'<code>{e(str(hook))}</code>: {len(members)} latents</summary><div class="dash-grid">'
                     + "".join(card_html(c) for c in members) + "</div></details>")
    return "\n".join(parts)
