"""Simulated lead traffic: contract events with a hidden ground truth. Pure, no I/O.

Leads arrive over :data:`ARRIVAL_DAYS` simulated days. Each lead gets explicit fields
(``lead_created``, sometimes a later ``lead_updated``), web sessions (``visit`` then
``page_view``/``click``/``download``/``form_submit``), email campaigns (``email_open``,
``email_click``), CRM stage moves in funnel order, sales activities, ``email_replied`` and,
for most leads, an outcome (``deal_won``/``deal_lost``); a few lost leads are then deleted.

The hidden truth: a latent intent, correlated with the explicit fit (industry, job title,
company size, source), drives behaviour; the win probability ``p_win`` mixes the fit with
what the lead did: downloading an asset and reaching ``proposal`` matter most.
Same seed, same events (``random.Random(seed)``; event ids ``sim-{seed}-{lead}-{k}``).

>>> events = simulate(3, seed=1)
>>> events == simulate(3, seed=1), events[0]["type"], events[0]["event_id"]
(True, 'lead_created', 'sim-1-0-0')
>>> all(a["ts"] <= b["ts"] for a, b in zip(events, events[1:]))
True
>>> events[0]["props"]["fields"]["owner"]
'Ana Ruiz'
>>> [lead.lead_id for lead in simulate_population(2, seed=1)]
['lead-1-00000', 'lead-1-00001']
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from models.events import STAGES, parse_ts

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
ARRIVAL_DAYS = 30
_S = 1000
_MIN = 60 * _S
_H = 60 * _MIN
_DAY = 24 * _H

# Explicit fit weights (log-odds). Values follow the default models/scoring.toml where it has rules.
INDUSTRIES = {"software": 0.8, "financial services": 0.6, "manufacturing": 0.3, "healthcare": 0.2,
              "retail": 0.0, "education": -0.3, "student": -1.2}
JOB_TITLES = {"VP Sales": 0.9, "Head of Marketing": 0.8, "Director": 0.6, "Manager": 0.3,
              "Analyst": 0.0, "Engineer": -0.1, "Intern": -1.0}
SOURCES = {"referral": 0.6, "event": 0.4, "partner": 0.3, "organic": 0.2, "paid_search": 0.0,
           "outbound": -0.2}
COUNTRIES = (("United States", 30), ("Germany", 12), ("United Kingdom", 12), ("France", 8),
             ("India", 15), ("Brazil", 6), ("Canada", 7), ("Japan", 5), ("Australia", 5))
CITIES = {"United States": ("New York", "Austin", "Chicago"), "Germany": ("Berlin", "Munich"),
          "United Kingdom": ("London", "Manchester"), "France": ("Paris", "Lyon"),
          "India": ("Bangalore", "Mumbai"), "Brazil": ("Sao Paulo",), "Canada": ("Toronto",),
          "Japan": ("Tokyo",), "Australia": ("Sydney",)}
PAGES = ("/", "/product", "/features", "/pricing", "/customers", "/blog/lead-scoring",
         "/docs/getting-started", "/about", "/careers", "/contact")
ASSETS = ("whitepaper-lead-scoring.pdf", "roi-calculator.xlsx", "case-study-acme.pdf", "buyers-guide.pdf")
FORMS = ("demo-request", "newsletter", "contact-sales", "webinar-signup")
CAMPAIGNS = ("welcome", "product-tour", "case-studies", "webinar-invite", "pricing-update", "nurture-1",
             "nurture-2")
LOST_REASONS = ("no budget", "chose competitor", "no decision", "bad timing", "not a fit")
ACTIVITY_KINDS = ("call", "email", "meeting", "task")
# The sales managers leads are assigned to (the CRM's ``owner`` field); round robin by lead index,
# so owners do not change the other draws of a seed.
OWNERS = ("Ana Ruiz", "Ben Okafor", "Chloe Martin", "Dev Patel")


@dataclass(frozen=True)
class Market:
    """What makes a lead win: the explicit fit's weights (log-odds) and the weight of a download.

    A market shift (``simulate_population(shift_at=...)``) swaps one market for another part-way
    through the arrivals: concept drift, as real histories have (new segments buy, an asset stops
    telling buyers apart), for testing how fast each learner follows it.
    """

    industries: dict[str, float]
    sources: dict[str, float]
    download: float


MARKET = Market(INDUSTRIES, SOURCES, download=1.4)
# After the shift: the industries that bought least buy most (and the other way round), the sources
# change places, and a download says little about buying (leads download as often as before).
SHIFTED_MARKET = Market(dict(zip(INDUSTRIES, sorted(INDUSTRIES.values()))),
                        dict(zip(SOURCES, sorted(SOURCES.values()))), download=0.2)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@dataclass
class SimLead:
    """One simulated lead: its hidden truth and its events (each sorted by ``ts``)."""

    lead_id: str
    arrival_ms: int
    fields: dict[str, Any]
    fit: float
    intent: float
    downloaded: bool
    reached_proposal: bool
    p_win: float
    outcome: str | None  # "won", "lost" or None (still open)
    events: list[dict[str, Any]] = field(default_factory=list)


class _LeadBuilder:
    """Collects (ts, type, props) of one lead, then stamps ids and makes ts strictly increasing."""

    def __init__(self, seed: int, index: int, lead_id: str) -> None:
        self.seed, self.index, self.lead_id = seed, index, lead_id
        self.items: list[tuple[int, int, str, dict[str, Any]]] = []

    def add(self, ts: int, event_type: str, props: dict[str, Any] | None = None) -> None:
        self.items.append((ts, len(self.items), event_type, props or {}))

    def build(self) -> list[dict[str, Any]]:
        events, last = [], -1
        for k, (ts, _, event_type, props) in enumerate(sorted(self.items)):
            last = max(ts, last + 1)  # strictly increasing: causal order survives any re-sort by ts
            events.append({"event_id": f"sim-{self.seed}-{self.index}-{k}", "lead_id": self.lead_id,
                           "type": event_type, "ts": last, "props": props})
        return events


def _poisson(rng: random.Random, lam: float) -> int:
    """Knuth's sampler; fine for the small means used here."""
    limit, k, p = math.exp(-lam), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def _explicit(rng: random.Random, market: Market) -> tuple[dict[str, Any], float]:
    countries, weights = zip(*COUNTRIES)
    country = rng.choices(countries, weights)[0]
    industry = rng.choice(list(INDUSTRIES))
    title = rng.choices(list(JOB_TITLES), (1, 2, 3, 6, 6, 5, 2))[0]
    size = int(math.exp(rng.uniform(0.0, math.log(5000))))  # log-uniform 1..5000 employees
    source = rng.choice(list(SOURCES))
    size_fit = 0.5 if 50 <= size <= 1000 else 0.2 if size > 1000 else -0.6 if size < 10 else 0.0
    fit = market.industries[industry] + JOB_TITLES[title] + market.sources[source] + size_fit
    fields: dict[str, Any] = {"country": country, "city": rng.choice(CITIES[country]), "industry": industry,
                              "job_title": title, "company_size": size, "age": rng.randint(21, 64),
                              "source": source, "newsletter_opt_in": rng.random() < 0.4}
    return fields, fit


def _session(b: _LeadBuilder, rng: random.Random, t: int, n: int, intent: float) -> bool:
    """One web session from ``t``; returns whether an asset was downloaded."""
    sid = f"{b.lead_id}-s{n}"
    pages = 1 + _poisson(rng, max(0.3, 2.0 + intent))
    duration = 0
    views = []
    for _ in range(pages):
        gap = rng.randint(10, 180)
        duration += gap
        views.append((duration, rng.choice(PAGES[3:5] if rng.random() < _sigmoid(intent - 1) else PAGES)))
    b.add(t, "visit", {"session_id": sid, "duration_s": duration, "pages": pages, "url": views[0][1]})
    for offset, url in views:
        b.add(t + offset * _S, "page_view", {"url": url, "session_id": sid})
        if rng.random() < 0.3:
            b.add(t + offset * _S + 5 * _S, "click", {"url": url + "#cta", "session_id": sid})
    end = t + duration * _S + 10 * _S
    downloaded = rng.random() < _sigmoid(-2.2 + 0.9 * intent)
    if downloaded:
        b.add(end, "download", {"asset": rng.choice(ASSETS)})
    if rng.random() < _sigmoid(-2.5 + 0.8 * intent):
        b.add(end + 20 * _S, "form_submit", {"form": rng.choice(FORMS)})
    return downloaded


def _activities(b: _LeadBuilder, rng: random.Random, t: int, horizon: int, serial: list[int]) -> None:
    for _ in range(rng.randint(0, 2)):
        serial[0] += 1
        aid, kind = f"{b.lead_id}-a{serial[0]}", rng.choice(ACTIVITY_KINDS)
        created = t + rng.randint(10 * _MIN, 4 * _H)
        due = created + rng.randint(1, 3) * _DAY
        b.add(created, "activity_created", {"activity_id": aid, "kind": kind, "due_ts": due})
        if rng.random() < 0.75 and due < horizon:
            b.add(created + rng.randint(_H, due - created), "activity_completed", {"activity_id": aid, "kind": kind})
        elif due < horizon:
            b.add(due, "activity_overdue", {"activity_id": aid, "kind": kind, "due_ts": due})
            if rng.random() < 0.5 and due + _DAY < horizon:
                b.add(due + _DAY, "activity_completed", {"activity_id": aid, "kind": kind})


def _lead(rng: random.Random, seed: int, index: int, arrival: int, market: Market) -> SimLead:
    lead_id = f"lead-{seed}-{index:05d}"
    b = _LeadBuilder(seed, index, lead_id)
    fields, fit = _explicit(rng, market)
    intent = rng.gauss(0.6 * fit, 1.0)
    created_fields = dict(fields)
    late_field = rng.random() < 0.25
    if late_field:  # some CRM records get company_size only later
        del created_fields["company_size"]
    created_fields["owner"] = OWNERS[index % len(OWNERS)]
    b.add(arrival, "lead_created", {"fields": created_fields})
    life = rng.randint(5, 25) * _DAY
    active_end = arrival + int(life * 0.8)  # behaviour happens before the outcome at arrival+life
    if late_field:
        b.add(rng.randint(arrival + _H, active_end), "lead_updated",
              {"fields": {"company_size": fields["company_size"]}})
    if rng.random() < 0.1:
        promoted = "Director" if fields["job_title"] != "Director" else "VP Sales"
        b.add(rng.randint(arrival + _H, active_end), "lead_updated", {"fields": {"job_title": promoted}})
    # Web sessions: the first right at sign-up, the rest over the active period.
    n_sessions = 1 + _poisson(rng, min(12.0, math.exp(0.3 + 0.5 * intent)))
    starts = sorted([arrival + 2 * _S] + [rng.randint(arrival + _H, active_end) for _ in range(n_sessions - 1)])
    downloaded = False
    for n, t in enumerate(starts):
        downloaded |= _session(b, rng, t, n, intent)
    # Email campaigns every few days.
    t = arrival + rng.randint(_H, 2 * _DAY)
    while t < active_end:
        campaign = rng.choice(CAMPAIGNS)
        if rng.random() < _sigmoid(-0.3 + 0.7 * intent):
            b.add(t + rng.randint(_MIN, 6 * _H), "email_open", {"campaign": campaign})
            if rng.random() < _sigmoid(-1.2 + 0.7 * intent):
                b.add(t + 6 * _H + rng.randint(_MIN, _H), "email_click",
                      {"campaign": campaign, "url": f"/{campaign}"})
        t += rng.randint(3, 7) * _DAY
    # Stages before the decision: each further step is less likely; intent and downloads help.
    stage_times = sorted(rng.randint(arrival + _H, active_end) for _ in range(4))
    b.add(arrival + _MIN, "stage_changed", {"stage": "new"})
    reached = 0
    serial = [0]
    for i, ts in enumerate(stage_times, start=1):
        if rng.random() >= _sigmoid(1.2 - 0.45 * i + 0.8 * intent + 0.6 * downloaded):
            break
        reached = i
        b.add(ts, "stage_changed", {"stage": STAGES[i]})
        _activities(b, rng, ts, arrival + life, serial)
    replied = reached >= 1 and rng.random() < _sigmoid(-1.0 + 0.8 * intent)
    if replied:
        b.add(rng.randint(stage_times[0], active_end), "email_replied", {"thread_id": f"{lead_id}-t1"})
    reached_proposal = reached >= STAGES.index("proposal")
    p_win = _sigmoid(-2.6 + 0.5 * fit + market.download * downloaded + 2.0 * reached_proposal + 0.5 * replied
                     + 0.1 * min(n_sessions, 6))
    outcome = None
    close = arrival + life
    if rng.random() >= 0.12:  # the rest stay open
        outcome = "won" if rng.random() < p_win else "lost"
        # Winners walk on to negotiation, most of them to closing, before signing; losers often get a
        # step or two further before they drop out, so the last stage hints at the outcome without giving
        # it away (some losers reach closing, some winners sign from negotiation).
        if outcome == "won":
            last = max(reached, STAGES.index("closing") - (rng.random() < 0.3))
        else:
            last = min(reached + (rng.random() < 0.4) + (reached >= 3 and rng.random() < 0.5), len(STAGES) - 1)
        for i in range(reached + 1, last + 1):
            b.add(active_end + (i - reached) * (close - active_end) // (last - reached + 1), "stage_changed",
                  {"stage": STAGES[i]})
        if outcome == "won":
            b.add(close, "deal_won", {"amount": float(rng.randint(20, 400) * 100)})
        else:
            b.add(close, "deal_lost", {"reason": rng.choice(LOST_REASONS)})
            if rng.random() < 0.02:
                b.add(close + _DAY, "lead_deleted")
    return SimLead(lead_id, arrival, fields, fit, intent, downloaded, reached_proposal, p_win, outcome, b.build())


def simulate_population(leads: int, seed: int, start_ms: int = START_MS,
                        shift_at: float | None = None) -> list[SimLead]:
    """Simulate ``leads`` leads with their hidden truth, in arrival order.

    Parameters
    ----------
    leads : int
        How many leads arrive.
    seed : int
        The seed of the one ``random.Random`` used: same seed, same leads and events.
    start_ms : int
        Simulated epoch milliseconds of the start; arrivals spread over ``ARRIVAL_DAYS`` days.
    shift_at : float, optional
        The fraction of the leads (in arrival order) after which the market shifts from
        :data:`MARKET` to :data:`SHIFTED_MARKET`. None: no shift (the same leads as before this
        option existed: the shift draws nothing from the seed).

    Returns
    -------
    list of SimLead
        Each with ``p_win``, ``outcome`` and its events sorted by ``ts``.

    Examples
    --------
    >>> lead = simulate_population(1, seed=3)[0]
    >>> 0 < lead.p_win < 1, lead.events[0]["type"], lead.outcome in ("won", "lost", None)
    (True, 'lead_created', True)

    After a shift the old best industry wins least (the fit's part of the odds only):

    >>> shifted = simulate_population(2000, seed=3, shift_at=0.5)
    >>> def rate(leads, industry):
    ...     closed = [l for l in leads if l.outcome and l.fields["industry"] == industry]
    ...     return sum(l.outcome == "won" for l in closed) / len(closed)
    >>> rate(shifted[:1000], "software") > rate(shifted[:1000], "education")
    True
    >>> rate(shifted[1000:], "software") < rate(shifted[1000:], "education")
    True
    """
    if leads < 0:
        raise ValueError(f"leads={leads}: expected a whole number >= 0")
    if shift_at is not None and not 0.0 <= shift_at <= 1.0:
        raise ValueError(f"shift_at={shift_at}: expected a fraction of the leads, from 0 to 1")
    rng = random.Random(seed)
    arrivals = sorted(start_ms + rng.randrange(ARRIVAL_DAYS * _DAY) for _ in range(leads))
    shift = leads if shift_at is None else round(shift_at * leads)
    return [_lead(rng, seed, i, t, MARKET if i < shift else SHIFTED_MARKET) for i, t in enumerate(arrivals)]


def merge_events(population: Iterable[SimLead]) -> list[dict[str, Any]]:
    """All leads' events in one list sorted by ``ts`` (ties: arrival order, then the lead's own order)."""
    keyed = [(e["ts"], i, k, e) for i, lead in enumerate(population) for k, e in enumerate(lead.events)]
    keyed.sort(key=lambda x: x[:3])
    return [e for *_, e in keyed]


def simulate(leads: int, seed: int, start_ms: int = START_MS) -> list[dict[str, Any]]:
    """The contract events of :func:`simulate_population`, merged and sorted by ``ts`` (epoch ms).

    >>> len(simulate(0, seed=5))
    0
    """
    return merge_events(simulate_population(leads, seed, start_ms))


def timed(events: Iterable[dict[str, Any]]) -> Iterator[tuple[float, dict[str, Any]]]:
    """Pair each event with its simulated seconds since the first event (for ``--speedup``).

    ``ts`` may be epoch milliseconds or RFC 3339; events are expected in ``ts`` order.

    >>> [t for t, _ in timed([{"ts": 1000}, {"ts": "1970-01-01T00:00:03Z"}])]
    [0.0, 2.0]
    """
    first: int | None = None
    for event in events:
        ts = parse_ts(event["ts"])
        first = ts if first is None else first
        yield (ts - first) / 1000, event
