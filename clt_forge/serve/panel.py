"""The node panel, the job list and the logit chart of `clt serve`, as HTML text.

What a click on each kind of node shows:
- CLT feature: explanation and detection score, activation here, frequency, activation
  histogram (this node's activation marked), top / bottom logits of its decoder, top
  activating examples with every token shaded by the feature's activation, and its
  strongest input and output links in the graph;
- logit: the token and its probability; error node: its magnitude (the summed |direct
  effect| out of it) and influence; embedding: the token; cluster: its members.

These are returned as HTML strings that the page writes into its panel in one step
(assets/serve.js): a panel holds several hundred elements (one per example token), and
as Dash components each would cost the renderer about a millisecond. Every piece of text
from a graph or feature file passes through `esc`.
"""

from __future__ import annotations

from html import escape
from typing import Any

from clt_forge.artifacts.graph import EMBEDDING, ERROR, FEATURE, LOGIT, parse_node
from clt_forge.serve.layout import logit_token, node_title, short_token
from clt_forge.serve.pruning import GraphView

__all__ = ["empty_panel", "job_board", "logit_chart", "node_panel"]

MAX_EXAMPLES = 8
MAX_LINKS = 6


def esc(text: Any) -> str:
    return escape(str(text), quote=True)


def tag(name: str, *content: str, cls: str | None = None, **attrs: Any) -> str:
    """<name class=cls attrs...>content</name>; `content` is HTML already, attribute values are escaped.
    Attribute names use _ for - (data_node -> data-node)."""
    pairs = ([f'class="{esc(cls)}"'] if cls else []) + [
        f'{k.rstrip("_").replace("_", "-")}="{esc(v)}"' for k, v in attrs.items() if v is not None
    ]
    opening = " ".join([name, *pairs])
    return f"<{opening}>{''.join(content)}</{name}>"


def empty_panel(message: str = "Click a node to see what it does.") -> str:
    return tag("div", esc(message), cls="muted")


def _stat(label: str, value: str) -> str:
    return tag("div", tag("span", esc(label), cls="stat-label"), tag("span", esc(value), cls="stat-value"), cls="stat")


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def histogram(counts: list[int], act_max: float, mark: float | None) -> str:
    """Bars over [0, act_max]; `mark` (this node's activation) as a vertical line."""
    top = max(counts, default=0) or 1
    n = max(len(counts), 1)
    bars = "".join(
        tag(
            "div",
            cls="hist-bar",
            style=f"height:{max(2.0, 100 * c / top) if c else 0:.0f}%",
            title=f"{act_max * i / n:.3g}–{act_max * (i + 1) / n:.3g}: {c}",
        )
        for i, c in enumerate(counts)
    )
    inner = tag("div", bars, cls="hist-bars")
    if mark is not None and act_max > 0:
        inner += tag(
            "div", cls="hist-mark", style=f"left:{min(100.0, 100 * mark / act_max):.1f}%", title=f"here: {mark:.3g}"
        )
    axis = tag("div", tag("span", "0"), tag("span", f"{act_max:.3g}"), cls="hist-axis")
    return tag("div", tag("div", inner, cls="hist"), axis)


def example_row(example: dict[str, Any], act_max: float) -> str:
    """One context: each token shaded by the activation on it; the example's own token outlined."""
    tokens, acts = example.get("tokens", []), example.get("tokens_acts_list", [])
    centre = example.get("train_token_ind")
    spans = []
    for i, (token, act) in enumerate(zip(tokens, acts, strict=False)):
        alpha = 0.0 if act_max <= 0 else max(0.0, min(1.0, float(act) / act_max))
        style = f"background:rgba(245,158,11,{alpha:.2f})" if alpha > 0 else None
        spans.append(
            tag(
                "span",
                esc(short_token(token, 40)),
                cls="tok centre" if i == centre else "tok",
                style=style,
                title=f"{act:.3g}",
            )
        )
    peak = max(acts, default=0.0)
    return tag(
        "div", tag("span", f"{peak:.2f}", cls="example-peak"), tag("span", *spans, cls="example-text"), cls="example"
    )


def _chips(tokens: list[Any], kind: str) -> str:
    return tag(
        "div", *(tag("span", esc(short_token(str(t), 16)), cls=f"chip {kind}") for t in tokens[:10]), cls="chips"
    )


def _links(view: GraphView, node_id: str, prompt_tokens: list[str]) -> str:
    incoming = sorted((link for link in view.links if link["target"] == node_id), key=lambda x: -abs(x["weight"]))
    outgoing = sorted((link for link in view.links if link["source"] == node_id), key=lambda x: -abs(x["weight"]))
    out = []
    for title, links, end in (("Strongest inputs", incoming, "source"), ("Strongest outputs", outgoing, "target")):
        if not links:
            continue
        rows = []
        for link in links[:MAX_LINKS]:
            other = view.by_id.get(link[end])
            name = node_title(other, prompt_tokens) if other else link[end]
            sign = "pos" if link["weight"] >= 0 else "neg"
            rows.append(
                tag(
                    "div",
                    tag("span", f"{link['weight']:+.3g}", cls=f"weight {sign}"),
                    tag("span", esc(name), cls="link-name"),
                    cls="link-row",
                )
            )
        out.append(tag("h4", f"{title} ({len(links)})") + tag("div", *rows))
    return "".join(out)


def _where(pos: int, prompt_tokens: list[str]) -> str:
    return tag("div", esc(f"at position {pos}, token “{short_token(prompt_tokens[pos])}”"), cls="subtitle")


def node_panel(
    node: dict[str, Any],
    *,
    view: GraphView,
    prompt_tokens: list[str],
    feature: dict[str, Any] | None = None,
    features_note: str | None = None,
    error_magnitude: float | None = None,
) -> str:
    """The panel of one node (see the module docstring for what each kind shows)."""
    kind, node_id = node["feature_type"], node["node_id"]
    body: list[str] = []
    if kind == FEATURE:
        layer, pos, index = parse_node(node).layer_pos_feature
        title = f"Feature L{layer} #{index}"
        body.append(_where(pos, prompt_tokens))
        explanation = (feature or {}).get("explanation") or node.get("clerp")
        body.append(
            tag("div", esc(explanation), cls="explanation")
            if explanation
            else tag("div", "No explanation.", cls="muted")
        )
        stats = [
            _stat("activation here", _fmt(node.get("activation"))),
            _stat("influence", _fmt(node.get("influence"))),
        ]
        if feature is not None:
            stats += [
                _stat("detection score", _fmt(feature.get("detection_score"), 2)),
                _stat("frequency", f"{100 * float(feature.get('activation_frequency') or 0):.3g}%"),
                _stat("max activation", _fmt(feature.get("act_max"))),
            ]
        body.append(tag("div", *stats, cls="stats"))
        if feature is None:
            body.append(tag("div", esc(features_note or "No feature database for this graph."), cls="muted"))
        else:
            body.append(_feature_details(feature, node.get("activation")))
    elif kind == LOGIT:
        title = f"Output “{short_token(logit_token(node))}”"
        stats = [
            _stat("probability", f"{float(node.get('token_prob') or 0):.3f}"),
            _stat("target logit", "yes" if node.get("is_target_logit") else "no"),
            _stat("influence", _fmt(node.get("influence"))),
        ]
        body.append(tag("div", *stats, cls="stats"))
    elif kind == ERROR:
        title = f"MLP error L{node['layer']}"
        body.append(_where(node["ctx_idx"], prompt_tokens))
        body.append(
            tag(
                "div",
                "What the CLT misses of this layer's MLP output here; its magnitude is the summed |direct effect| out of it.",
                cls="muted",
            )
        )
        body.append(
            tag(
                "div",
                _stat("magnitude", _fmt(error_magnitude)),
                _stat("influence", _fmt(node.get("influence"))),
                cls="stats",
            )
        )
    elif kind == EMBEDDING:
        title = f"Token “{short_token(prompt_tokens[node['ctx_idx']])}”"
        body.append(
            tag(
                "div",
                _stat("position", str(node["ctx_idx"])),
                _stat("influence", _fmt(node.get("influence"))),
                cls="stats",
            )
        )
    else:
        title = f"Cluster “{node.get('clerp', '')}”"
        members = [view.by_id[m] for m in node.get("members", []) if m in view.by_id]
        body.append(tag("h4", f"Members ({len(members)})"))
        body.append(tag("ul", *(tag("li", esc(node_title(m, prompt_tokens))) for m in members), cls="members"))
    body.append(_links(view, node_id, prompt_tokens))
    return tag("div", tag("h3", esc(title), cls="panel-title", data_node=node_id), *body, cls="panel")


def _feature_details(feature: dict[str, Any], activation: float | None) -> str:
    out = []
    act_max = float(feature.get("act_max") or 0.0)
    if feature.get("histogram"):
        out += [tag("h4", "Activation histogram"), histogram(list(feature["histogram"]), act_max, activation)]
    if feature.get("top_logits") or feature.get("bottom_logits"):
        out += [
            tag("h4", "Top logits"),
            _chips(feature.get("top_logits", []), "pos"),
            tag("h4", "Bottom logits"),
            _chips(feature.get("bottom_logits", []), "neg"),
        ]
    quantiles = feature.get("examples_quantiles") or []
    top = quantiles[0].get("examples", []) if quantiles else []
    if top:
        out.append(tag("h4", "Top activating examples"))
        out.append(tag("div", *(example_row(e, act_max) for e in top[:MAX_EXAMPLES]), cls="examples"))
    return "".join(out)


def logit_chart(job: dict[str, Any]) -> str:
    """Next-token probabilities before (grey) and after (colour) an intervention, largest first."""
    result = job["result"]
    rows: dict[str, dict[str, Any]] = {}
    for change in result["top_before"] + result["top_after"] + result["largest_changes"][:5]:
        rows.setdefault(change["token"], change)
    ordered = sorted(rows.values(), key=lambda c: -max(c["prob_before"], c["prob_after"]))[:12]
    top = max((max(c["prob_before"], c["prob_after"]) for c in ordered), default=1.0) or 1.0
    lines = []
    for change in ordered:
        before, after = change["prob_before"], change["prob_after"]
        delta = after - before
        bars = tag(
            "div",
            tag("div", cls="bar before", style=f"width:{100 * before / top:.1f}%"),
            tag("div", cls="bar after", style=f"width:{100 * after / top:.1f}%"),
            cls="bars",
            title=f"before {before:.3f}, after {after:.3f}",
        )
        lines.append(
            tag(
                "div",
                tag("span", esc(short_token(change["token"], 12)), cls="chart-token"),
                bars,
                tag("span", f"{delta:+.3f}", cls=f"chart-delta {'pos' if delta >= 0 else 'neg'}"),
                cls="chart-row",
                data_token=change["token"],
                data_after=f"{after:.4f}",
            )
        )
    legend = tag(
        "div", tag("span", cls="swatch before"), "before", tag("span", cls="swatch after"), "after", cls="legend"
    )
    title = tag("div", esc(f"Job {job['number']}: {job['label']} — next-token probabilities"), cls="chart-title")
    return tag("div", title, legend, *lines, cls="chart", data_job=job["number"])


def job_board(jobs: list[dict[str, Any]]) -> str:
    """Every submitted job with its state, newest first; the chart of the newest finished one."""
    rows = []
    for job in reversed(jobs):
        status = job["status"]
        detail = {
            "queued": f"queued ({job.get('ahead', 0)} ahead)",
            "running": f"running… {job.get('stage') or ''}",
        }.get(status, status)
        if status == "failed":
            detail = f"failed: {job.get('error', '')}"
        elif status == "done":
            detail = f"done in {job.get('seconds', 0):.1f} s"
        rows.append(
            tag(
                "div",
                tag("span", f"#{job['number']}", cls="job-number"),
                tag("span", esc(job["label"]), cls="job-label"),
                tag("span", esc(detail.strip()), cls=f"job-status {status}"),
                cls="job-row",
                data_status=status,
                data_number=job["number"],
            )
        )
    done = [job for job in jobs if job["status"] == "done"]
    chart = logit_chart(done[-1]) if done else tag("div", "The chart appears when a job finishes.", cls="muted")
    return tag("div", *rows, cls="jobs") + chart
