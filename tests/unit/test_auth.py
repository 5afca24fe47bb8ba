"""API keys, the request rate per key, and where the app listens without keys; the HTTP
API with keys set, in-process (the Serve app over HTTP: tests/integration/test_security.py)."""

import pytest
from starlette.testclient import TestClient

from pipelines.cli import parser
from serving.auth import (
    KeyCheck,
    KeyConfigError,
    RateLimit,
    append_key,
    configured_key_hashes,
    hash_key,
    listen_host,
    read_key_file,
)
from serving.http_api import HttpApi, Limits
from serving.model_slots import LoadedModels
from serving.model_source import resolve_model
from serving.openapi import openapi_document
from serving.predictor import ClassifierPredictor
from tests.unit.test_predictor import export_dir  # noqa: F401 (a fixture: the tiny export)

KEY = "k3y-for-the-tests-0123456789"
BRIGHT = {"instances": [[0.9] * 16]}


def keyed_client(export_dir, **limits) -> TestClient:  # noqa: F811
    models = LoadedModels(classifier=ClassifierPredictor(resolve_model(str(export_dir))))
    api = HttpApi(
        models,
        Limits(**limits),
        openapi=lambda: openapi_document(models),
        keys=KeyCheck({"tests": hash_key(KEY)}),
    )
    return TestClient(api)


def test_keys_come_from_the_environment_and_a_file_of_hashes(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# team keys\nalice {hash_key('a' * 20)}\n\nci {hash_key('c' * 20)}\n")
    hashes = configured_key_hashes(
        {"DLPIPE_API_KEYS": f"{KEY}, {'b' * 16}", "DLPIPE_API_KEYS_FILE": str(keys_file)}
    )
    assert hashes == {
        "key-1": hash_key(KEY),
        "key-2": hash_key("b" * 16),
        "alice": hash_key("a" * 20),
        "ci": hash_key("c" * 20),
    }
    assert configured_key_hashes({}) == {}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (f"alice {KEY}\n", r"keys:1: expected `NAME SHA256` .* not the key itself"),
        (f"alice {hash_key(KEY)}\nalice {hash_key('x' * 20)}\n", "keys:2: .*'alice' is used twice"),
        (f"{hash_key(KEY)}\n", "keys:1: expected"),
    ],
)
def test_a_bad_keys_file_names_its_line_and_never_echoes_a_key(tmp_path, content, message):
    (tmp_path / "keys").write_text(content)
    with pytest.raises(KeyConfigError, match=message) as error:
        read_key_file(tmp_path / "keys")
    assert KEY not in str(error.value)


def test_a_short_key_is_refused_by_number_not_by_value():
    with pytest.raises(KeyConfigError, match="DLPIPE_API_KEYS: key 2 is 5 characters") as error:
        configured_key_hashes({"DLPIPE_API_KEYS": f"{KEY},short"})
    assert "short" not in str(error.value)


def dlpipe(*argv: str) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


def test_keygen_appends_a_hash_prints_the_key_once_and_refuses_a_taken_name(tmp_path, capsys):
    keys_file = tmp_path / "secrets" / "api_keys.txt"
    assert dlpipe("serve", "keygen", "alice", "--keys-file", str(keys_file)) == 0
    key = capsys.readouterr().out.strip()
    assert len(key) >= 40 and key not in keys_file.read_text()
    assert read_key_file(keys_file) == {"alice": hash_key(key)}
    assert keys_file.stat().st_mode & 0o077 == 0  # readable by its owner only
    assert dlpipe("serve", "keygen", "alice", "--keys-file", str(keys_file)) == 2
    assert "'alice' exists" in capsys.readouterr().err
    assert append_key(keys_file, "bob") != key
    assert sorted(read_key_file(keys_file)) == ["alice", "bob"]


def test_a_key_is_recognised_only_whole_and_as_a_bearer_token():
    check = KeyCheck({"alice": hash_key(KEY), "bob": hash_key("b" * 20)})
    assert check.identify(f"Bearer {KEY}") == "alice"
    assert check.identify(f"bearer {'b' * 20}") == "bob"
    for wrong in (None, "", KEY, f"Bearer {KEY[:-1]}", f"Bearer {KEY}x", f"Basic {KEY}"):
        assert check.identify(wrong) is None
    assert not KeyCheck({}).enabled


def test_the_rate_limit_admits_a_burst_then_one_per_interval_per_key():
    now = [0.0]
    limit = RateLimit(per_s=2, clock=lambda: now[0])
    assert [limit.wait_s("a") for _ in range(3)] == [0.0, 0.0, 0.5]
    assert limit.wait_s("b") == 0.0  # another key has its own bucket
    now[0] = 0.5
    assert limit.wait_s("a") == 0.0 and limit.wait_s("a") == pytest.approx(0.5)
    assert RateLimit(per_s=0).wait_s("a") == 0.0  # 0: no limit


def test_without_keys_the_app_listens_on_loopback_unless_told_otherwise():
    assert listen_host("127.0.0.1", keys=False, allow_unauthenticated=False)[0] == "127.0.0.1"
    host, why = listen_host("0.0.0.0", keys=False, allow_unauthenticated=False)
    assert host == "127.0.0.1" and "not 0.0.0.0" in why and "DLPIPE_API_KEYS" in why
    host, why = listen_host("0.0.0.0", keys=False, allow_unauthenticated=True)
    assert host == "0.0.0.0" and why.startswith("WARNING")
    assert listen_host("0.0.0.0", keys=True, allow_unauthenticated=False)[0] == "0.0.0.0"


def test_with_keys_every_route_but_the_probes_is_401_without_a_valid_one(export_dir):  # noqa: F811
    http = keyed_client(export_dir)
    assert http.get("/healthz").status_code == 200
    assert http.get("/readyz").status_code == 200
    for method, path in [
        ("GET", "/v1/models"),
        ("GET", "/openapi.json"),
        ("POST", "/v1/classify"),
        ("POST", "/v1/fill-mask"),
        ("GET", "/no-such-route"),  # not even a 404: without a key the routes do not show
    ]:
        for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}):
            response = http.request(method, path, headers=headers, json=BRIGHT)
            assert response.status_code == 401, (method, path, headers)
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert "API key" in response.json()["detail"]
    response = http.post("/v1/classify", json=BRIGHT, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200 and response.json()["predictions"][0]["label"] == "light"


def test_a_key_over_its_rate_gets_429_with_retry_after(export_dir):  # noqa: F811
    http = keyed_client(export_dir, max_requests_per_s_per_key=3)
    headers = {"Authorization": f"Bearer {KEY}"}
    codes = [http.post("/v1/classify", json=BRIGHT, headers=headers).status_code for _ in range(6)]
    assert codes[:3] == [200, 200, 200] and 429 in codes[3:]
    response = http.post("/v1/classify", json=BRIGHT, headers=headers)
    assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1
    assert http.get("/healthz").status_code == 200  # probes are not rate limited


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"instances": [[True] + [0.5] * 15]}, ["body", "instances", 0, 0]),
        ({"instances": [["0.5"] * 16]}, ["body", "instances", 0, 0]),
    ],
)
def test_booleans_and_strings_are_not_numbers(export_dir, body, field):  # noqa: F811
    response = keyed_client(export_dir).post(
        "/v1/classify", json=body, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == field
