"""Champion and challenger: a second version of a slot's model served beside the one its
alias names, set live through the deployment's `user_config.challengers` (no restart):

    challengers:
      classifier:
        source: models:/dlpipe-classifier/7   # pinned by `dlpipe serve challenger`
        mode: canary       # canary | shadow | off
        share: 0.05        # canary: the share of requests the challenger answers
        sticky: false      # canary: all of a client's requests the same way
        shadow_share: 1.0  # shadow: the share of requests copied to the challenger
        shadow_budget: 0.05 # shadow: the most of a replica's time the copies take

- canary: the challenger answers `share` of the requests; sticky, by a hash of the client
  (its API key's name, else its `X-Client-Id` header), so one client sees one model;
- shadow: the champion answers every request; after its answer, the challenger is given
  the same request (off the client's path) and the two answers are compared: rows that
  agree, the confidence gap, each version's latency (`ShadowStats`, in /v1/models). The
  copies take at most `shadow_budget` of the replica's time (`ShadowBudget`): under a load
  that fills the replica, a sample of the requests is copied, not every one, and the
  champion's clients wait at most that much longer;
- off: the challenger stays loaded and answers nothing.

Every answer names the model and version that gave it. `dlpipe serve promote` and
`rollback` (serving/promotion.py) move the champion alias with the checks they print.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import statistics
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from serving.contracts import Predictor

MODES = ("off", "canary", "shadow")

log = logging.getLogger(__name__)

Compare = Callable[[dict[str, Any], dict[str, Any]], tuple[int, int, float]]
"""(champion's answer, challenger's answer) -> (rows that agree, rows, sum of the rows'
confidence gaps): how a kind's two answers to one request are compared in shadow mode."""


class ChallengerConfigError(ValueError):
    """A `challengers` setting that cannot be served; the message names the setting."""


@dataclass(frozen=True)
class ChallengerConfig:
    source: str
    """A pinned registry version (models:/NAME/VERSION) or an export folder."""
    mode: str = "off"
    share: float = 0.05
    sticky: bool = False
    shadow_share: float = 1.0
    shadow_budget: float = 0.05

    @classmethod
    def parse(cls, slot: str, raw: Any) -> ChallengerConfig:
        where = f"challengers.{slot}"
        if not isinstance(raw, Mapping):
            raise ChallengerConfigError(f"{where}: expected a mapping, got {raw!r}")
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise ChallengerConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}")
        source = raw.get("source")
        if not isinstance(source, str) or not source:
            raise ChallengerConfigError(f"{where}.source: name the challenger's model")
        mode = raw.get("mode", cls.mode)
        if mode not in MODES:
            raise ChallengerConfigError(f"{where}.mode: expected one of {MODES}, got {mode!r}")
        shares = {}
        for key in ("share", "shadow_share", "shadow_budget"):
            value = raw.get(key, cls.__dataclass_fields__[key].default)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise ChallengerConfigError(
                    f"{where}.{key}: expected a number from 0 to 1, got {value!r}"
                )
            shares[key] = float(value)
        if shares["shadow_budget"] == 0:
            raise ChallengerConfigError(
                f"{where}.shadow_budget: 0 would copy nothing (that is mode off); expected a "
                "share of the replica's time above 0"
            )
        sticky = raw.get("sticky", cls.sticky)
        if not isinstance(sticky, bool):
            raise ChallengerConfigError(f"{where}.sticky: expected true or false, got {sticky!r}")
        return cls(source, mode, sticky=sticky, **shares)

    def as_user_config(self) -> dict[str, Any]:
        return asdict(self)


def parse_challengers(raw: Any, slots: Mapping[str, Any]) -> dict[str, ChallengerConfig]:
    """`user_config.challengers` checked: slot -> its challenger. `slots` maps each slot the
    app has to whether it can be compared in shadow mode."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ChallengerConfigError(f"challengers: expected a mapping of slots, got {raw!r}")
    configs = {}
    for slot, value in raw.items():
        if slot not in slots:
            raise ChallengerConfigError(
                f"challengers.{slot}: no such slot; slots: {', '.join(sorted(slots))}"
            )
        config = ChallengerConfig.parse(slot, value)
        if config.mode == "shadow" and not slots[slot]:
            raise ChallengerConfigError(
                f"challengers.{slot}.mode: shadow compares the two answers, and this kind's "
                "answers are random draws; use canary"
            )
        configs[slot] = config
    return configs


def client_bucket(client: str) -> float:
    """Where `client` falls in [0, 1): the same place in every replica and every run."""
    digest = hashlib.blake2b(client.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def to_challenger(config: ChallengerConfig, client: str | None, draw: float) -> bool:
    """Whether a canary sends this request to the challenger (`draw`: uniform in [0, 1))."""
    if config.mode != "canary":
        return False
    if config.sticky and client:
        return client_bucket(client) < config.share
    return draw < config.share


LATENCY_WINDOW = 2000
"""The latest answers whose times make a version's p50 in shadow mode."""


class ShadowStats:
    """What shadow mode has seen of one slot's champion and challenger."""

    def __init__(self, champion: str | None, challenger: str | None) -> None:
        self.champion, self.challenger = champion, challenger
        self.requests = self.rows = self.agreed = self.errors = self.skipped = 0
        self.over_budget = 0
        """Requests not copied because the copies had spent their share of the time."""
        self.gap_sum = 0.0
        self.latency: dict[str, deque[float]] = {
            "champion": deque(maxlen=LATENCY_WINDOW),
            "challenger": deque(maxlen=LATENCY_WINDOW),
        }

    def record(
        self, compared: tuple[int, int, float], champion_s: float, challenger_s: float
    ) -> None:
        agreed, rows, gap = compared
        self.requests += 1
        self.rows += rows
        self.agreed += agreed
        self.gap_sum += gap
        self.latency["champion"].append(champion_s)
        self.latency["challenger"].append(challenger_s)

    def summary(self) -> dict[str, Any]:
        def p50_ms(role: str) -> float | None:
            times = self.latency[role]
            return round(statistics.median(times) * 1000, 3) if times else None

        return {
            "champion_version": self.champion,
            "challenger_version": self.challenger,
            "requests": self.requests,
            "rows": self.rows,
            "agreement": self.agreed / self.rows if self.rows else None,
            "mean_confidence_gap": self.gap_sum / self.rows if self.rows else None,
            "champion_p50_ms": p50_ms("champion"),
            "challenger_p50_ms": p50_ms("challenger"),
            "errors": self.errors,
            "skipped": self.skipped,
            "over_budget": self.over_budget,
        }


class ShadowBudget:
    """The share of a replica's time one challenger's shadow copies may take: a bucket of
    seconds that fills at `share` a second (up to `BURST_S`) and that the copies' measured
    time empties; while it is empty, requests are not copied.

    Copies are work the champion's clients wait behind whenever the replica is busy: a
    digit's copy (the challenger's inference and the comparison) measured ~27 us, a tenth
    of the request (benchmarks/README.md). Under a load that fills the replica the budget
    makes the copies a sample; under a lighter one, every request is copied."""

    BURST_S = 0.05
    """What copies may spend at once after an idle spell (~500 digits)."""

    def __init__(self) -> None:
        self.seconds = self.BURST_S
        self._at = time.perf_counter()

    def allows(self, share: float, now: float | None = None) -> bool:
        """Whether a copy may be made now, the bucket filled for the time since last asked."""
        now = time.perf_counter() if now is None else now
        self.seconds = min(self.BURST_S, self.seconds + (now - self._at) * share)
        self._at = now
        return self.seconds > 0

    def spend(self, seconds: float) -> None:
        self.seconds -= seconds


@dataclass
class Challenger:
    """A slot's challenger: its settings, model, shadow figures and the copies' budget."""

    config: ChallengerConfig
    predictor: Predictor
    shadow: ShadowStats
    budget: ShadowBudget = field(default_factory=ShadowBudget)


SHADOW_WAIT_S = 0.01
"""How long the first queued shadow copy waits for others before the challenger answers
them together (sooner when `limit` copies are queued)."""


class ShadowCopies:
    """Shadow mode's copies of requests, answered by the challenger after the champion's
    answer has gone out, off the clients' path.

    A route with a shortcut (`Route.again`: the challenger's answer from what the champion
    saw) has its copies queued and answered together, in one call per challenger, on the
    event loop `SHADOW_WAIT_S` after the first (or as soon as `limit` are queued): one
    onnxruntime call for dozens of copies under load, where a task, a batcher round and a
    full answer per copy were three of the costs profiled (benchmarks/README.md). Other
    routes: one task per copy, through the route's own answer, unbatched. The time either
    takes is spent from the challenger's `ShadowBudget`. At most `limit` one-copy tasks
    run and twice `limit` copies wait at once (those queued while a full queue's call is
    pending are kept); beyond, a request is not copied (counted as skipped), so a slow
    challenger cannot pile up work ahead of the clients' requests.
    """

    def __init__(self) -> None:
        self._queued: list[tuple[Any, Challenger, ShadowStats, Any, dict[str, Any], float]] = []
        self._timer: asyncio.Handle | None = None
        self._running: set[asyncio.Task] = set()
        """One-copy tasks still running (held: the loop keeps only weak references)."""

    def offer(
        self,
        route: Any,
        challenger: Challenger,
        copy: tuple[Any, Any, dict[str, Any], float],
        limit: int,
    ) -> None:
        """`copy`: (the validated request, what the champion saw of it or None, the
        champion's answer, its seconds)."""
        request, seen, answer, champion_s = copy
        # The figures of this champion and challenger, taken now: a champion reload before
        # the copy is answered gives the slot new figures, and this copy is not theirs.
        stats = challenger.shadow
        queued = route.again is not None and seen is not None
        if (len(self._queued) >= 2 * limit) if queued else (len(self._running) >= limit):
            stats.skipped += 1
            return
        loop = asyncio.get_running_loop()
        if queued:
            self._queued.append((route, challenger, stats, seen, answer, champion_s))
            if len(self._queued) == limit:  # answered at the loop's next turn
                if self._timer is not None:
                    self._timer.cancel()
                self._timer = loop.call_soon(self._answer_queued)
            elif self._timer is None:
                self._timer = loop.call_later(SHADOW_WAIT_S, self._answer_queued)
            return
        task = loop.create_task(
            self._answer_one(route, challenger, stats, request, answer, champion_s)
        )
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def _answer_queued(self) -> None:
        queued, self._queued, self._timer = self._queued, [], None
        groups: dict[tuple[int, int], list[tuple]] = {}
        for entry in queued:
            groups.setdefault((id(entry[0]), id(entry[1])), []).append(entry)
        for entries in groups.values():
            route, challenger = entries[0][:2]
            started = time.perf_counter()
            try:
                answers = route.again(challenger.predictor, [entry[3] for entry in entries])
            except Exception as exc:  # the challenger's failure is a figure, not the client's
                answers = [exc] * len(entries)
            took = time.perf_counter() - started
            try:
                for (_, _, stats, _, answer, champion_s), other in zip(
                    entries, answers, strict=True
                ):
                    if isinstance(other, Exception):
                        _failed(route, stats, other)
                    else:
                        stats.record(route.compare(answer, other), champion_s, took)
            except Exception:  # a comparison's bug: logged, the other groups still answered
                log.exception("shadow %s: comparing the answers failed", route.path)
            finally:
                challenger.budget.spend(time.perf_counter() - started)

    async def _answer_one(
        self,
        route: Any,
        challenger: Challenger,
        stats: ShadowStats,
        request: Any,
        answer: dict[str, Any],
        champion_s: float,
    ) -> None:
        started = time.perf_counter()
        try:
            # Not through the route's batcher: answered here at once, so that the time
            # measured is the copy's own, not a wait behind the clients' batches.
            other, _ = await route.answer(challenger.predictor, request, None)
            took = time.perf_counter() - started
            stats.record(route.compare(answer, other), champion_s, took)
        except Exception as exc:
            took = time.perf_counter() - started
            _failed(route, stats, exc)
        challenger.budget.spend(took)


def _failed(route: Any, stats: ShadowStats, exc: Exception) -> None:
    if stats.errors == 0:
        log.warning("shadow %s on version %s failed: %r", route.path, stats.challenger, exc)
    stats.errors += 1


# --- how each kind's two answers compare ------------------------------------------------


def compare_classifications(a: dict[str, Any], b: dict[str, Any]) -> tuple[int, int, float]:
    pairs = list(zip(a["predictions"], b["predictions"], strict=True))
    agreed = sum(x["label"] == y["label"] for x, y in pairs)
    return agreed, len(pairs), sum(abs(x["confidence"] - y["confidence"]) for x, y in pairs)


def compare_segments(a: dict[str, Any], b: dict[str, Any]) -> tuple[int, int, float]:
    pairs = list(zip(a["assignments"], b["assignments"], strict=True))
    return sum(x["segment"] == y["segment"] for x, y in pairs), len(pairs), 0.0


def compare_fill_mask(a: dict[str, Any], b: dict[str, Any]) -> tuple[int, int, float]:
    """Each [MASK]: the same top token; the gap between the two top scores."""
    agreed, rows, gap = 0, 0, 0.0
    for x, y in zip(a["results"], b["results"], strict=True):
        for mx, my in zip(x["masks"], y["masks"], strict=True):
            top_x, top_y = mx["predictions"][0], my["predictions"][0]
            agreed += top_x["token_id"] == top_y["token_id"]
            rows += 1
            gap += abs(top_x["score"] - top_y["score"])
    return agreed, rows, gap


EMBEDDING_AGREEMENT = 0.9
"""Two versions' embeddings of a text agree when their cosine similarity reaches this."""


def compare_embeddings(a: dict[str, Any], b: dict[str, Any]) -> tuple[int, int, float]:
    """Per text: cosine similarity (both are unit vectors) at least EMBEDDING_AGREEMENT;
    the gap is 1 - that similarity. Versions of different widths never agree."""
    import numpy as np

    x, y = np.asarray(a["embeddings"]), np.asarray(b["embeddings"])
    if x.shape != y.shape:
        return 0, len(x), float(len(x))
    cosine = (x * y).sum(axis=1)
    return int((cosine >= EMBEDDING_AGREEMENT).sum()), len(x), float((1 - cosine).sum())
