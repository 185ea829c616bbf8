"""The department heads' dashboard: one HTML page, served by the worker at ``/dashboard``.

Server-rendered, no JavaScript, refreshed by the browser every 15 s. :func:`render_dashboard` is
pure (reports in, HTML out); :func:`dashboard_data` reads them from Redis.
"""

from __future__ import annotations

from html import escape
from typing import Any

from streams.reports import funnel_with_rates, leads_and_model
from streams.settings import Settings

TOP_LEADS = 15


async def dashboard_data(settings: Settings, stall_days: float = 14.0) -> dict[str, Any]:
    states, model = await leads_and_model(settings)
    open_leads = [st for st in states if not st.get("outcome") and "score" in st]
    top = sorted(open_leads, key=lambda st: -st["score"])[:TOP_LEADS]
    return {"funnel": funnel_with_rates(states, model, stall_days), "model": model, "top": top}


def render_dashboard(data: dict[str, Any]) -> str:
    """The page for ``dashboard_data``'s result.

    >>> from models.funnel import funnel_report
    >>> html = render_dashboard({"funnel": funnel_report([], 0), "model": None, "top": []})
    >>> "<h1>leadstream</h1>" in html and "no model yet" in html
    True
    """
    f, model = data["funnel"], data["model"]
    parts = [_HEAD, "<h1>leadstream</h1>", _summary(f, model), _alerts(f), _funnel_table(f),
             _top_table(data["top"]), _model_section(model), "</body></html>"]
    return "\n".join(parts)


_HEAD = """<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="15">
<title>leadstream dashboard</title><style>
body{font-family:system-ui,sans-serif;margin:2em;color:#222} table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right} th{background:#f3f3f3} td.l,th.l{text-align:left}
.alert{background:#fff4e5;border-left:4px solid #f0a020;padding:.4em .8em;margin:.3em 0}
</style></head><body>"""


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else escape(str(value))


def _summary(f: dict[str, Any], model: dict[str, Any] | None) -> str:
    version = model["version"] if model else 0
    return (f"<p>{f['leads']} leads; closed {f['closed']['won']} won, {f['closed']['lost']} lost "
            f"(win rate {_fmt(f['win_rate'])}); median days to close {_fmt(f['median_days_to_close'])}; "
            f"email reply rate {_fmt(f['email_reply_rate'])}; overdue activities {f['overdue_activities']}; "
            f"model version {version}</p>")


def _alerts(f: dict[str, Any]) -> str:
    """The funnel diagnostics worth a manager's attention: stalls, bottleneck, replies, overdue work."""
    alerts = []
    for stage, row in f["stages"].items():
        if row["open"] and row["stalled"] / row["open"] >= 0.5:
            alerts.append(f"{row['stalled']} of {row['open']} open leads in <b>{stage}</b> have not moved for "
                          f"over {_fmt(f.get('stall_days', 14.0))} days")
    if f["bottleneck"]:
        rate = f["stages"][f["bottleneck"]]["conversion_to_next"]
        alerts.append(f"lowest conversion: <b>{f['bottleneck']}</b> (only {_fmt(rate)} move on)")
    if f["email_reply_rate"] is not None and f["email_reply_rate"] < 0.1:
        alerts.append(f"low email reply rate: {_fmt(f['email_reply_rate'])}")
    if f["overdue_activities"]:
        alerts.append(f"{f['overdue_activities']} sales activities are overdue")
    return "".join(f'<div class="alert">{a}</div>' for a in alerts)


def _funnel_table(f: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td class=l>{stage}</td><td>{row['reached']}</td><td>{row['open']}</td><td>{row['stalled']}</td>"
        f"<td>{_fmt(row['median_days_in_stage'])}</td><td>{_fmt(row['conversion_to_next'])}</td>"
        f"<td>{_fmt(row.get('learned_win_rate'))}</td>"
        f"<td class=l>{' '.join(f'{g}:{n}' for g, n in row['grades'].items())}</td></tr>"
        for stage, row in f["stages"].items())
    return ("<h2>Funnel</h2><table><tr><th class=l>stage</th><th>reached</th><th>open</th><th>stalled</th>"
            "<th>median days in stage</th><th>moved on</th><th>learned win rate</th><th class=l>grades (open)</th></tr>"
            f"{rows}</table>")


def _top_table(top: list[dict[str, Any]]) -> str:
    rows = "".join(
        f"<tr><td class=l>{escape(st['lead_id'])}</td><td>{st['score']:.2f}</td><td>{escape(st['grade'])}</td>"
        f"<td class=l>{escape(st.get('stage') or '-')}</td><td class=l>{escape(_why(st.get('reasons', [])))}</td></tr>"
        for st in top)
    return ("<h2>Best open leads</h2><table><tr><th class=l>lead</th><th>score</th><th>grade</th><th class=l>stage</th>"
            f"<th class=l>why</th></tr>{rows}</table>")


def _why(reasons: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['feature']} {r['contribution']:+.2f}" for r in reasons[:3])


def _model_section(model: dict[str, Any] | None) -> str:
    if not model:
        return "<h2>Model</h2><p>no model yet: it appears with the first closed deal; scores come from the rules</p>"
    tournament = model.get("tournament", {})
    learners = [(f"{name}{' (champion)' if name == tournament.get('champion') else ''}", v["whole"])
                for name, v in tournament.get("learners", {}).items()]
    rows = "".join(
        f"<tr><td class=l>{escape(name)}</td><td>{_fmt(m.get('n'))}</td><td>{_fmt(m.get('roc_auc'))}</td>"
        f"<td>{_fmt(m.get('log_loss'))}</td><td>{_fmt(m.get('brier'))}</td></tr>"
        for name, m in [("rules", model["rules"]), ("served", model["champion"]), *learners])
    return (f"<h2>Model</h2><p>version {model['version']}, learned from {model['outcomes']['won']} won and "
            f"{model['outcomes']['lost']} lost deals; drifts {model['drifts']}; refused promotions "
            f"{model['rejected_promotions']}. Accuracy is measured on each deal before learning from it.</p>"
            "<table><tr><th class=l>scorer</th><th>snapshots</th><th>ROC AUC</th><th>log loss</th><th>Brier</th></tr>"
            f"{rows}</table>")
