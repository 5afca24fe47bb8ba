"""Champion and challenger in one replica (serving/lifecycle.py, serving/model_slots.py):
the settings' checks, the canary's split, shadow mode's comparison, over the real ASGI app
and real onnxruntime predictors of the tiny export."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from starlette.testclient import TestClient

from serving.http_api import HttpApi, Limits
from serving.http_server import ReplicaHttpServer
from serving.kinds import BY_SLOT, classify_again
from serving.lifecycle import (
    Challenger,
    ChallengerConfig,
    ChallengerConfigError,
    ShadowBudget,
    ShadowCopies,
    ShadowStats,
    client_bucket,
    compare_classifications,
    compare_embeddings,
    parse_challengers,
    to_challenger,
)
from serving.model_slots import LoadedModels
from serving.model_source import resolve_model
from serving.predictor import ClassifierPredictor, InputError
from tests.helpers import free_port
from tests.unit.test_predictor import export_dir  # noqa: F401 (a fixture: the tiny export)

SHADOWABLE = {slot: kind.can_shadow for slot, kind in BY_SLOT.items()}
BRIGHT = [[0.9] * 16]


@pytest.mark.parametrize(
    "raw, named",
    [
        ({"classifier": {"source": "m", "mode": "canary", "share": 1.5}}, "classifier.share"),
        ({"classifier": {"source": "m", "share": -0.1}}, "classifier.share"),
        ({"classifier": {"source": "m", "shadow_share": "all"}}, "classifier.shadow_share"),
        ({"classifier": {"source": "m", "shadow_budget": 0}}, "classifier.shadow_budget: 0"),
        ({"classifier": {"source": "m", "shadow_budget": 2}}, "classifier.shadow_budget"),
        ({"classifier": {"source": "m", "mode": "blue-green"}}, "classifier.mode"),
        ({"classifier": {"source": "m", "sticky": "yes"}}, "classifier.sticky"),
        ({"classifier": {"mode": "canary"}}, "classifier.source"),
        ({"classifier": {"source": "m", "shares": 0.1}}, "unknown setting(s) shares"),
        ({"regressor": {"source": "m"}}, "challengers.regressor: no such slot"),
        ({"generator": {"source": "m", "mode": "shadow"}}, "generator.mode"),
        (["classifier"], "challengers: expected a mapping"),
    ],
)
def test_each_bad_setting_is_named(raw, named):
    with pytest.raises(ChallengerConfigError, match="challengers") as caught:
        parse_challengers(raw, SHADOWABLE)
    assert named in str(caught.value)


def test_a_canary_sends_its_share_and_a_sticky_one_keeps_each_client_on_one_side():
    config = ChallengerConfig("m", "canary", share=0.2)
    draws = [i / 10_000 for i in range(10_000)]
    assert sum(to_challenger(config, None, d) for d in draws) == 2_000
    sticky = ChallengerConfig("m", "canary", share=0.2, sticky=True)
    clients = [f"client-{i}" for i in range(5_000)]
    sides = [to_challenger(sticky, c, 0.99) for c in clients]  # the draw is not read
    assert sides == [to_challenger(sticky, c, 0.0) for c in clients]
    assert abs(sum(sides) / len(sides) - 0.2) < 0.02
    assert client_bucket("alice") == client_bucket("alice") != client_bucket("bob")
    # Shadow and off send nothing to the challenger to answer.
    for mode in ("shadow", "off"):
        assert not to_challenger(ChallengerConfig("m", mode, share=1.0), None, 0.0)


def test_answers_compare_row_by_row():
    a = {"predictions": [{"label": "1", "confidence": 0.9}, {"label": "2", "confidence": 0.6}]}
    b = {"predictions": [{"label": "1", "confidence": 0.7}, {"label": "3", "confidence": 0.5}]}
    agreed, rows, gap = compare_classifications(a, b)
    assert (agreed, rows) == (1, 2) and gap == pytest.approx(0.3)
    same = {"embeddings": [[1.0, 0.0], [0.0, 1.0]]}
    turned = {"embeddings": [[1.0, 0.0], [1.0, 0.0]]}
    assert compare_embeddings(same, turned)[:2] == (1, 2)


def models_with_challenger(export_dir, **settings) -> LoadedModels:  # noqa: F811
    models = LoadedModels(classifier=ClassifierPredictor(resolve_model(str(export_dir))))
    config = ChallengerConfig(str(export_dir), **settings)
    models.load_challengers({"classifier": config}, None, 1, False)
    return models


def test_pick_splits_requests_by_the_configured_share(export_dir):  # noqa: F811
    models = models_with_challenger(export_dir, mode="canary", share=0.25)
    challenger = models.challengers["classifier"].predictor
    picks = [models.pick("classifier", lambda: None)[0] is challenger for _ in range(20_000)]
    assert abs(sum(picks) / len(picks) - 0.25) < 0.02
    models.load_challengers({}, None, 1, False)  # taken away: the champion alone
    assert models.pick("classifier", lambda: None) == (models.get("classifier"), None)
    assert models.infos()[0]["challenger"] is None


def test_shadow_mode_compares_every_request_off_the_answer(export_dir):  # noqa: F811
    models = models_with_challenger(export_dir, mode="shadow")
    # The replica's own server on a real socket: one event loop, where the shadow copies
    # run after the answers have gone.
    server = ReplicaHttpServer(HttpApi(models, Limits()), "127.0.0.1", free_port())
    server.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as http:
            shadow = shadowed(http, 20)
    finally:
        server.stop()
    assert shadow["requests"] == 20 and shadow["rows"] == 20
    assert shadow["agreement"] == 1.0 and shadow["mean_confidence_gap"] == pytest.approx(0.0)
    assert shadow["champion_p50_ms"] > 0 and shadow["challenger_p50_ms"] > 0


def test_concurrent_copies_are_answered_together_each_compared(export_dir):  # noqa: F811
    """Copies queued while the loop answered others go through the challenger in one call
    (ShadowCopies); each request is still compared with its own champion answer."""
    models = models_with_challenger(export_dir, mode="shadow")
    server = ReplicaHttpServer(HttpApi(models, Limits()), "127.0.0.1", free_port())
    server.start()
    bodies = [{"instances": [[0.1 * (i % 10)] * 16] * (1 + i % 3)} for i in range(120)]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as http:

            def ask(body: dict) -> int:
                return http.post("/v1/classify", json=body).status_code

            with ThreadPoolExecutor(12) as pool:
                assert set(pool.map(ask, bodies)) == {200}
            deadline = time.monotonic() + 10
            while (shadow := shadow_of(http))["requests"] < len(bodies):
                assert time.monotonic() < deadline, shadow
                time.sleep(0.05)
    finally:
        server.stop()
    assert shadow["rows"] == sum(len(body["instances"]) for body in bodies)
    assert shadow["agreement"] == 1.0 and shadow["errors"] == shadow["skipped"] == 0


def test_copies_answered_together_keep_their_own_rows_and_failures(export_dir):  # noqa: F811
    classifier = ClassifierPredictor(resolve_model(str(export_dir)))
    bright, dark = np.full((2, 1, 4, 4), 0.9, np.float32), np.full((1, 1, 4, 4), 0.1, np.float32)
    overflowing = np.full((1, 1, 4, 4), 3e38, np.float32)  # finite, but not its output
    answers = classify_again(classifier, [bright, overflowing, dark])
    assert [row["label"] for row in answers[0]["predictions"]] == ["light", "light"]
    assert isinstance(answers[1], InputError)
    assert [row["label"] for row in answers[2]["predictions"]] == ["dark"]
    # The same labels and confidences as the answers the clients get.
    alone = classifier.classify(np.concatenate([bright, dark]))
    together = answers[0]["predictions"] + answers[2]["predictions"]
    assert compare_classifications({"predictions": alone}, {"predictions": together}) == (
        3,
        3,
        pytest.approx(0.0),
    )


def test_queued_copies_are_bounded_and_all_kept_ones_are_compared(export_dir):  # noqa: F811
    """Twelve copies offered in one loop turn with limit 4: the queue is answered at the
    next turn, eight kept (twice the limit), four skipped; each kept one compared."""
    classifier = ClassifierPredictor(resolve_model(str(export_dir)))
    route = BY_SLOT["classifier"].routes[0]
    challenger = Challenger(ChallengerConfig("m", "shadow"), classifier, ShadowStats("1", "2"))
    bright = np.full((1, 1, 4, 4), 0.9, np.float32)
    answer = {"predictions": classifier.classify(bright)}

    async def offer_twelve() -> None:
        copies = ShadowCopies()
        for _ in range(12):
            copies.offer(route, challenger, (None, bright, answer, 0.001), 4)
        await asyncio.sleep(0.05)

    asyncio.run(offer_twelve())
    summary = challenger.shadow.summary()
    assert (summary["requests"], summary["skipped"], summary["agreement"]) == (8, 4, 1.0)
    # The eight copies' time came out of the challenger's budget.
    assert challenger.budget.seconds < ShadowBudget.BURST_S


def test_the_shadow_budget_is_a_share_of_the_time():
    """A full bucket allows copies until their time empties it; then it refills at the
    budget's share of the time passed: 10% of a second pays for 0.1 s of copies."""
    budget = ShadowBudget()
    start = time.perf_counter()
    assert budget.allows(0.1, start)
    budget.spend(ShadowBudget.BURST_S + 0.02)  # a batch of copies that overran the bucket
    assert not budget.allows(0.1, start + 0.1)  # 0.01 s back of the 0.02 owed
    assert budget.allows(0.1, start + 0.3)  # 0.03 s back: 0.01 s to spend
    assert budget.seconds == pytest.approx(0.01)
    assert budget.allows(0.1, start + 100) and budget.seconds == ShadowBudget.BURST_S  # capped


def test_copies_over_the_budget_are_counted_and_the_champion_answers_alone(export_dir):  # noqa: F811
    """Shadow mode with its budget spent: requests are answered by the champion and not
    copied, counted as over_budget; once time refills it, copies go on."""
    models = models_with_challenger(export_dir, mode="shadow")
    challenger = models.challengers["classifier"]
    challenger.budget.spend(10.0)  # ten seconds owed: at 0.05 of the time, 200 s to refill
    server = ReplicaHttpServer(HttpApi(models, Limits()), "127.0.0.1", free_port())
    server.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as http:
            for _ in range(5):
                answer = http.post("/v1/classify", json={"instances": BRIGHT})
                assert answer.status_code == 200
            time.sleep(0.1)  # a copy, had one been made, would be compared by now
            assert (shadow_of(http)["over_budget"], shadow_of(http)["requests"]) == (5, 0)
            challenger.budget.seconds = ShadowBudget.BURST_S
            shadow = shadowed(http, 5)
    finally:
        server.stop()
    assert (shadow["requests"], shadow["over_budget"]) == (5, 5)


def shadow_of(http: httpx.Client) -> dict:
    return http.get("/v1/models").json()["models"][0]["challenger"]["shadow"]


def shadowed(http: httpx.Client, count: int) -> dict:
    """Send `count` requests; the shadow figures once all were compared (or 10 s passed)."""
    for _ in range(count):
        answer = http.post("/v1/classify", json={"instances": BRIGHT})
        assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] == "light"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        shadow = shadow_of(http)
        if shadow["requests"] == count:
            break
        time.sleep(0.05)
    return shadow


def test_a_challenger_failing_its_checks_leaves_the_champion_alone(export_dir, tmp_path):  # noqa: F811
    models = LoadedModels(classifier=ClassifierPredictor(resolve_model(str(export_dir))))
    missing = ChallengerConfig(str(tmp_path / "nothing"), "canary", share=1.0)
    models.load_challengers({"classifier": missing}, None, 1, False)
    http = TestClient(HttpApi(models, Limits()))
    assert http.post("/v1/classify", json={"instances": BRIGHT}).status_code == 200
    info = http.get("/v1/models").json()["models"][0]
    assert "nothing" in info["challenger"]["error"]
    assert models.pick("classifier", lambda: None)[0] is models.get("classifier")


def test_promotion_checks_say_which_one_fails(export_dir, tmp_path):  # noqa: F811
    import json
    import shutil

    from serving.promotion import PromotionPolicy, promotion_checks

    champion = resolve_model(str(export_dir))
    worse = shutil.copytree(export_dir, tmp_path / "worse")
    card = json.loads((worse / "model_card.json").read_text())
    card["metrics"]["test_accuracy"] = 0.99  # a point below the champion's 1.0
    (worse / "model_card.json").write_text(json.dumps(card))
    shadow = {"requests": 500, "rows": 500, "agreement": 0.97, "mean_confidence_gap": 0.01}
    policy = PromotionPolicy(margin=0.005, min_agreement=0.95, min_shadowed=100)

    passed = promotion_checks("classifier", champion, champion, shadow, policy)
    assert [c.passed for c in passed] == [True, True, True]
    refused = promotion_checks("classifier", champion, resolve_model(str(worse)), shadow, policy)
    assert [c.name for c in refused if not c.passed] == ["held-out test_accuracy"]
    assert "0.9900 against the champion's 1.0000 (at least 0.9950)" in refused[1].detail
    few = promotion_checks("classifier", champion, champion, {**shadow, "requests": 20}, policy)
    assert not few[2].passed and "20 shadowed requests, at least 100 needed" in few[2].detail
    disagreeing = {**shadow, "agreement": 0.9}
    assert not promotion_checks("classifier", champion, champion, disagreeing, policy)[2].passed
