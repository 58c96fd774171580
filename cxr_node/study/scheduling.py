"""What runs next: no study's results wait for another study's films.

The worker (:class:`cxr_node.study.pipeline.Processor`) holds the studies it claimed and works in
*rounds* of at most ``[study] round_films`` films. Before each round it claims what room is left
(up to ``[model] batch_size`` studies held at once), in :func:`claim_order`; then :func:`plan`
picks the round's films from the held studies:

1. a study with no film left to analyse (all done, or none it could analyse) is recorded at once;
2. a study that waited while :data:`STARVE_FILMS` films of other studies were analysed gets one
   now (the longest held first), so a big study moves on however many small ones keep arriving:
   it gets at least one film in every ``STARVE_FILMS + 1`` analysed (bounded, never starved;
   counted in films, not rounds, because a round ends early when a study arrives);
3. the rest of the budget goes by order: the most urgent upstream first (DIMSE Priority HIGH, then
   MEDIUM, then LOW), then the fewest films left, then claim order: a small study fits whole; a
   big one is split across rounds, its films in their order.

In a round the studies run one after the other in that order (those owed a film first), each
through every stage and recorded (SR, outbox, audit, state) as soon as its last film is analysed;
a study's share of several films goes film by film, and the round ends early once a new study is
queued that the node has room to claim. So a one-film study that arrives while a forty-film study
is analysed waits for the film in progress, then for its own film, not for the forty. The pure
logic is here; the pipeline runs it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Hashable, Sequence

#: A study that waited while this many films of other studies were analysed gets one next.
STARVE_FILMS = 8
#: A queued study waiting this long is claimed as if it were small (see :func:`claim_order`).
CLAIM_AGING_SECONDS = 60.0

#: DIMSE Priority (PS3.7 9.3.1.1: 0x0002 LOW, 0x0000 MEDIUM, 0x0001 HIGH) -> rank, most urgent first.
DIMSE_RANK = {0x0001: 0, 0x0000: 1, 0x0002: 2}
MEDIUM = 1


def dimse_rank(priority: int | None) -> int:
    """The scheduling rank of a C-STORE request's Priority (unknown values count as MEDIUM)."""
    return DIMSE_RANK.get(priority, MEDIUM) if priority is not None else MEDIUM


@dataclass(frozen=True)
class Ticket:
    """One held study as the planner sees it."""

    key: Hashable          # (study UID, version)
    films_left: int        # films still to analyse (0: ready to record)
    seq: int               # claim order on this node (smaller: held longer)
    rank: int = MEDIUM     # upstream urgency, 0 most urgent (:func:`dimse_rank`)
    starved: int = 0       # films of other studies analysed since its last one (or its claim)


def plan(tickets: Sequence[Ticket], budget: int) -> list[tuple[Hashable, int]]:
    """The next round: ``(key, films)`` pairs in the order to run them, at most ``budget`` films in
    all (a study with nothing left gets 0 and comes first: it costs nothing). Studies given no
    film this round are left out."""
    if budget < 1:
        raise ValueError(f"a round needs a budget of at least one film (got {budget})")
    ready = sorted((t for t in tickets if t.films_left <= 0), key=lambda t: t.seq)
    active = [t for t in tickets if t.films_left > 0]
    take: dict[Hashable, int] = {}
    left = budget
    for t in sorted((t for t in active if t.starved >= STARVE_FILMS), key=lambda t: t.seq):
        if left <= 0:
            break
        take[t.key] = 1
        left -= 1
    order = sorted(active, key=lambda t: (t.rank, t.films_left, t.seq))
    for t in order:
        if left <= 0:
            break
        n = min(t.films_left - take.get(t.key, 0), left)
        if n > 0:
            take[t.key] = take.get(t.key, 0) + n
            left -= n
    first = [t for t in sorted(active, key=lambda t: t.seq) if t.starved >= STARVE_FILMS and take.get(t.key)]
    rest = [t for t in order if take.get(t.key) and t not in first]
    # studies owed a film run first: a round cut short for a new arrival has served them already
    return [(t.key, 0) for t in ready] + [(t.key, take[t.key]) for t in first + rest]


def claim_order(study, round_films: int, now: dt.datetime):
    """ORDER BY for claiming queued studies (``study``: the Study model): the most urgent upstream
    first, then studies that fit one round or have waited :data:`CLAIM_AGING_SECONDS` (so a small
    study is not held in the queue behind big ones while every slot is busy, and a big one is not
    passed over for ever), then first queued first."""
    from sqlalchemy import case, func

    cutoff = now - dt.timedelta(seconds=CLAIM_AGING_SECONDS)
    small_or_aged = case(((study.instance_count <= round_films) | (study.state_changed_at <= cutoff), 0), else_=1)
    return (func.coalesce(study.upstream_rank, MEDIUM), small_or_aged, study.state_changed_at)
