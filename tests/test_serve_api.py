"""Every endpoint and error path of the service, through FastAPI's TestClient."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from recsys_flowadam.artifact import load_artifact
from recsys_flowadam.serve import create_app
from recsys_flowadam.serve.scorer import Scorer
from recsys_flowadam.serve.settings import MAX_ID_LENGTH, Settings
from recsys_flowadam.serve.synthetic import random_artifact

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("artifacts")
    return {
        "a": random_artifact(root / "a", n_users=50, n_items=80, rank=8, model_type="biased-mf", seed=1, factor_std=1.0,
                             cold_users=2, cold_items=3),
        "b": random_artifact(root / "b", n_users=30, n_items=60, rank=4, model_type="cp", seed=2),
    }


@pytest.fixture(scope="module")
def scorer_a(artifacts) -> Scorer:
    return Scorer(load_artifact(artifacts["a"]))


@pytest.fixture
def client(artifacts) -> TestClient:
    return TestClient(create_app(Settings(artifact_dir=artifacts["a"], admin_token=TOKEN)))


@pytest.fixture
def empty_client() -> TestClient:
    return TestClient(create_app(Settings(artifact_dir=None)))


def _pairs(users, items):
    return {"pairs": [{"user": u, "item": i} for u, i in zip(users, items)]}


# -- health, readiness, model ---------------------------------------------------------------


def test_health_and_ready(client: TestClient, empty_client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["model_type"] == "biased-mf"
    assert empty_client.get("/health").status_code == 200
    not_ready = empty_client.get("/ready")
    assert not_ready.status_code == 503 and "no model is loaded" in not_ready.json()["detail"]


def test_model_info(client: TestClient, artifacts) -> None:
    meta = load_artifact(artifacts["a"]).meta
    info = client.get("/v1/model").json()
    assert info["model_type"] == "biased-mf" and info["rank"] == 8
    assert (info["n_users"], info["n_items"], info["n_contexts"]) == (50, 80, 0)
    assert info["rating_scale"] == {"min": 1.0, "max": 5.0}
    assert info["dataset"]["name"] == "synthetic" and info["dataset"]["seed"] == 1
    assert info["optimizer"]["name"] == meta.optimizer.name
    assert info["metrics"] == meta.metrics
    assert info["created_at"].startswith(meta.created_at.strftime("%Y-%m-%dT%H:%M:%S"))


def test_endpoints_without_model_are_503(empty_client: TestClient) -> None:
    assert empty_client.get("/v1/model").status_code == 503
    assert empty_client.post("/v1/predict", json=_pairs(["u1"], ["i1"])).status_code == 503
    assert empty_client.get("/v1/users/u1/recommendations").status_code == 503
    assert empty_client.get("/v1/items/i1/similar").status_code == 503


def test_openapi_docs(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/health", "/ready", "/v1/model", "/v1/predict", "/v1/users/{user}/recommendations",
                 "/v1/items/{item}/similar", "/v1/admin/reload"):
        assert path in paths
    body = paths["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["pairs"]["items"]["properties"]["user"]["maxLength"] == MAX_ID_LENGTH


# -- predict -------------------------------------------------------------------------------


def test_predict_equals_scorer(client: TestClient, scorer_a: Scorer) -> None:
    rng = np.random.default_rng(5)
    users = [f"u{k}" for k in rng.integers(0, 50, 300)] + ["stranger", "u4", "stranger"]
    items = [f"i{k}" for k in rng.integers(0, 80, 300)] + ["i3", "unseen", "unseen"]
    r = client.post("/v1/predict", json=_pairs(users, items))
    assert r.status_code == 200
    preds = r.json()["predictions"]
    assert [p["user"] for p in preds] == users and [p["item"] for p in preds] == items
    expected = scorer_a.predict(users, items)
    np.testing.assert_allclose([p["rating"] for p in preds], expected.ratings, rtol=0, atol=1e-12)
    assert all(1.0 <= p["rating"] <= 5.0 for p in preds)
    assert [p["known_user"] for p in preds[-3:]] == [False, True, False]
    assert [p["known_item"] for p in preds[-3:]] == [True, False, False]
    assert preds[-1]["rating"] == pytest.approx(3.0)  # mean of the 1..5 scale, no bias known


def test_ids_without_training_ratings_are_cold(client: TestClient, artifacts) -> None:
    """u49 and i79 are listed in the artifact but were never trained: served like unknown IDs."""
    t = load_artifact(artifacts["a"]).tensors
    r = client.post("/v1/predict", json=_pairs(["u49", "u1", "u49"], ["i2", "i79", "i79"])).json()["predictions"]
    assert [(p["known_user"], p["known_item"]) for p in r] == [(False, True), (True, False), (False, False)]
    assert r[0]["rating"] == pytest.approx(3.0 + float(t["item_bias"][2]))
    assert r[1]["rating"] == pytest.approx(3.0 + float(t["user_bias"][1]))
    assert r[2]["rating"] == pytest.approx(3.0)
    strict = client.post("/v1/predict", json={**_pairs(["u49"], ["i79"]), "strict": True})
    assert strict.status_code == 404 and strict.json()["detail"]["unknown_items"] == ["i79"]
    recs = client.get("/v1/users/u49/recommendations", params={"k": 3}).json()["items"]
    bias = np.asarray(t["item_bias"][:77])  # the cold ranking: global mean + item bias
    assert [x["item"] for x in recs] == [f"i{i}" for i in np.argsort(-bias)[:3]]
    similar = client.get("/v1/items/i79/similar")
    assert similar.status_code == 404 and "no training ratings" in similar.json()["detail"]


def test_predict_strict(client: TestClient) -> None:
    ok = client.post("/v1/predict", json={**_pairs(["u1"], ["i2"]), "strict": True})
    assert ok.status_code == 200
    r = client.post("/v1/predict", json={**_pairs(["u1", "zz", "zz", "u2"], ["i2", "i3", "qq", "aa"]), "strict": True})
    assert r.status_code == 404
    detail = r.json()["detail"]
    assert detail["unknown_users"] == ["zz"] and detail["unknown_items"] == ["aa", "qq"]
    assert "1 unknown user" in detail["message"] and "2 unknown item" in detail["message"]


def test_predict_limits(artifacts) -> None:
    small = TestClient(create_app(Settings(artifact_dir=artifacts["a"], max_pairs=5, max_body_bytes=2048)))
    assert small.post("/v1/predict", json=_pairs(["u1"] * 5, ["i1"] * 5)).status_code == 200
    r = small.post("/v1/predict", json=_pairs(["u1"] * 6, ["i1"] * 6))
    assert r.status_code == 413 and "at most 5" in r.json()["detail"]
    big = small.post("/v1/predict", json=_pairs(["u" * 200] * 20, ["i1"] * 20))
    assert big.status_code == 413


def test_predict_default_batch_limit(client: TestClient) -> None:
    assert client.post("/v1/predict", json=_pairs(["u1"] * 10_000, ["i1"] * 10_000)).status_code == 200
    r = client.post("/v1/predict", json=_pairs(["u1"] * 10_001, ["i1"] * 10_001))
    assert r.status_code == 413 and "10001 given, at most 10000" in r.json()["detail"]


BAD_BODIES = {
    "malformed json": (b'{"pairs": [', "json_invalid"),
    "not an object": (b"[1, 2, 3]", "model_type"),
    "empty list": (b'{"pairs": []}', "too_short"),
    "missing pairs": (b'{"strict": true}', "missing"),
    "number id": (b'{"pairs": [{"user": 196, "item": "242"}]}', "string_type"),
    "null id": (b'{"pairs": [{"user": null, "item": "242"}]}', "string_type"),
    "empty id": (b'{"pairs": [{"user": "", "item": "242"}]}', "string_too_short"),
    "absurd id": (json.dumps(_pairs(["x" * (MAX_ID_LENGTH + 1)], ["1"])).encode(), "string_too_long"),
    "extra field": (b'{"pairs": [{"user": "1", "item": "2", "rating": 5}]}', "extra_forbidden"),
    "strict not bool": (b'{"pairs": [{"user": "1", "item": "2"}], "strict": "maybe"}', "bool_parsing"),
    "pairs not list": (b'{"pairs": {"user": "1", "item": "2"}}', "list_type"),
    "empty body": (b"", "json_invalid"),
    "binary": (b"\xff\xfe\x00\x01", "json_invalid"),
    "lone surrogate": (b'{"pairs": [{"user": "\\ud800", "item": "1"}]}', "json_invalid"),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_predict_bad_input_is_422(client: TestClient, case: str) -> None:
    body, error_type = BAD_BODIES[case]
    r = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert any(e["type"] == error_type for e in errors), errors
    assert all(e["loc"][0] == "body" and e["msg"] for e in errors)


# -- recommendations and similar items --------------------------------------------------------


def test_recommendations(client: TestClient, scorer_a: Scorer) -> None:
    r = client.get("/v1/users/u7/recommendations", params={"k": 12})
    assert r.status_code == 200
    body = r.json()
    assert body["user"] == "u7" and body["k"] == 12 and body["exclude_rated"] is True
    ids, ratings = scorer_a.recommend("u7", 12)
    assert [x["item"] for x in body["items"]] == [f"i{i}" for i in ids]
    assert [x["title"] for x in body["items"]] == [f"Item {i}" for i in ids]
    np.testing.assert_allclose([x["rating"] for x in body["items"]], ratings, atol=1e-12)
    rated = set(scorer_a.train[7].indices.tolist())
    assert not rated & set(ids.tolist())
    everything = client.get("/v1/users/u7/recommendations", params={"k": 1000, "exclude_rated": "false"}).json()
    assert len(everything["items"]) == 80 and everything["exclude_rated"] is False
    ranks = [x["rating"] for x in everything["items"]]
    assert ranks == sorted(ranks, reverse=True)


def test_similar_items(client: TestClient, scorer_a: Scorer) -> None:
    r = client.get("/v1/items/i5/similar", params={"k": 4})
    assert r.status_code == 200
    body = r.json()
    ids, sims = scorer_a.similar("i5", 4)
    assert body["item"] == "i5" and body["k"] == 4
    assert [x["item"] for x in body["items"]] == [f"i{i}" for i in ids]
    np.testing.assert_allclose([x["similarity"] for x in body["items"]], sims, atol=1e-12)
    assert all(-1.0 - 1e-6 <= s <= 1.0 + 1e-6 for s in sims) and "i5" not in [x["item"] for x in body["items"]]


@pytest.mark.parametrize("url", ["/v1/users/nobody/recommendations", "/v1/items/nothing/similar"])
def test_unknown_id_is_404(client: TestClient, url: str) -> None:
    r = client.get(url)
    assert r.status_code == 404
    assert "unknown" in r.json()["detail"] and ("'nobody'" in r.json()["detail"] or "'nothing'" in r.json()["detail"])


@pytest.mark.parametrize("k", ["0", "-3", "1001", "ten", "1.5", ""])
@pytest.mark.parametrize("url", ["/v1/users/u1/recommendations", "/v1/items/i1/similar"])
def test_bad_k_is_422(client: TestClient, url: str, k: str) -> None:
    r = client.get(url, params={"k": k})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "k"]


def test_absurd_path_ids(client: TestClient) -> None:
    long_id = "x" * (MAX_ID_LENGTH + 1)
    for url in (f"/v1/users/{long_id}/recommendations", f"/v1/items/{long_id}/similar"):
        r = client.get(url)
        assert r.status_code == 422 and r.json()["detail"][0]["type"] == "string_too_long"
    assert client.get("/v1/users/u1/recommendations", params={"exclude_rated": "perhaps"}).status_code == 422
    # IDs are opaque strings: odd characters are just unknown IDs
    assert client.get("/v1/users/%00%F0%9F%98%80/recommendations").status_code == 404


# -- admin reload ----------------------------------------------------------------------------


def test_admin_disabled_without_token(artifacts) -> None:
    c = TestClient(create_app(Settings(artifact_dir=artifacts["a"])))
    r = c.post("/v1/admin/reload", headers=AUTH)
    assert r.status_code == 404 and "disabled" in r.json()["detail"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}])
def test_admin_needs_token(client: TestClient, headers: dict) -> None:
    r = client.post("/v1/admin/reload", headers=headers)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_reload_swaps_model(client: TestClient, artifacts) -> None:
    before = client.post("/v1/predict", json=_pairs(["u1"], ["i1"])).json()
    r = client.post("/v1/admin/reload", headers=AUTH, json={"path": str(artifacts["b"])})
    assert r.status_code == 200, r.text
    assert r.json()["model"]["model_type"] == "cp" and r.json()["path"] == str(artifacts["b"])
    assert client.get("/v1/model").json()["n_items"] == 60
    after = client.post("/v1/predict", json=_pairs(["u1"], ["i1"])).json()
    expected = Scorer(load_artifact(artifacts["b"])).predict(["u1"], ["i1"]).ratings[0]
    assert after["predictions"][0]["rating"] == pytest.approx(expected, abs=1e-12) != before["predictions"][0]["rating"]
    # no body: reload the configured artifact
    back = client.post("/v1/admin/reload", headers=AUTH)
    assert back.status_code == 200 and back.json()["model"]["model_type"] == "biased-mf"
    assert client.post("/v1/predict", json=_pairs(["u1"], ["i1"])).json() == before


def test_broken_reload_keeps_old_model(client: TestClient, artifacts, tmp_path: Path) -> None:
    before = client.post("/v1/predict", json=_pairs(["u1", "u2"], ["i1", "i9"])).json()
    broken = random_artifact(tmp_path / "broken", n_users=5, n_items=6, rank=2)
    (broken / "model.safetensors").write_bytes(b"garbage")
    for body in ({"path": str(broken)}, {"path": str(tmp_path / "missing")}):
        r = client.post("/v1/admin/reload", headers=AUTH, json=body)
        assert r.status_code == 422
        assert "previous model keeps serving" in r.json()["detail"] and body["path"] in r.json()["detail"]
    assert client.post("/v1/predict", json=_pairs(["u1", "u2"], ["i1", "i9"])).json() == before
    assert client.get("/v1/model").json()["model_type"] == "biased-mf"
    bad = client.post("/v1/admin/reload", headers=AUTH, json={"path": ""})
    assert bad.status_code == 422


def test_reload_without_any_path(artifacts) -> None:
    c = TestClient(create_app(Settings(admin_token=TOKEN)))
    r = c.post("/v1/admin/reload", headers=AUTH)
    assert r.status_code == 422 and "no path given" in r.json()["detail"]
    assert c.post("/v1/admin/reload", headers=AUTH, json={"path": str(artifacts["b"])}).status_code == 200
    assert c.get("/ready").status_code == 200


def test_in_flight_request_finishes_on_old_model(client: TestClient, artifacts, scorer_a: Scorer) -> None:
    """A predict that started before a reload answers from the model it started with."""
    holder = client.app.state.holder
    old_scorer = holder.current.scorer
    entered, release = threading.Event(), threading.Event()
    real_predict = old_scorer.predict

    def slow_predict(*args, **kwargs):
        entered.set()
        assert release.wait(10), "test timed out"
        return real_predict(*args, **kwargs)

    old_scorer.predict = slow_predict  # instance attribute: only the old model is slowed down
    result: dict = {}
    worker = threading.Thread(
        target=lambda: result.update(r=client.post("/v1/predict", json=_pairs(["u3"], ["i4"])))
    )
    worker.start()
    try:
        assert entered.wait(10), "request did not start"
        reload = client.post("/v1/admin/reload", headers=AUTH, json={"path": str(artifacts["b"])})
        assert reload.status_code == 200
        assert holder.current.scorer is not old_scorer
    finally:
        release.set()
        worker.join(10)
    old_answer = result["r"].json()["predictions"][0]["rating"]
    assert old_answer == pytest.approx(scorer_a.predict(["u3"], ["i4"]).ratings[0], abs=1e-12)
    new_answer = client.post("/v1/predict", json=_pairs(["u3"], ["i4"])).json()["predictions"][0]["rating"]
    assert new_answer == pytest.approx(Scorer(load_artifact(artifacts["b"])).predict(["u3"], ["i4"]).ratings[0])
    assert new_answer != old_answer


def test_broken_artifact_at_startup_raises(tmp_path: Path) -> None:
    from recsys_flowadam.artifact import ArtifactError

    with pytest.raises(ArtifactError, match="does not exist"):
        create_app(Settings(artifact_dir=tmp_path / "absent"))


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, artifacts) -> None:
    monkeypatch.setenv("RECSYS_FLOWADAM_ARTIFACT_DIR", str(artifacts["b"]))
    monkeypatch.setenv("RECSYS_FLOWADAM_MAX_PAIRS", "2")
    monkeypatch.setenv("RECSYS_FLOWADAM_ADMIN_TOKEN", "from-env")
    c = TestClient(create_app())
    assert c.get("/v1/model").json()["model_type"] == "cp"
    assert c.post("/v1/predict", json=_pairs(["u1"] * 3, ["i1"] * 3)).status_code == 413
    assert c.post("/v1/admin/reload", headers={"Authorization": "Bearer from-env"}).status_code == 200
