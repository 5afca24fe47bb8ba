"""Masked-language-model pretraining end to end: ingest -> prepare -> pretrain on 2 Ray
workers -> ONNX export -> both endpoints over real HTTP."""

from __future__ import annotations

import dataclasses
import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from models.transformer import EncoderConfig
from pipelines.selfsupervised.config import MlmConfig
from pipelines.stagekit.config import ExportConfig, TrainConfig
from tests.helpers import served_app

pytestmark = pytest.mark.integration


@dataclasses.dataclass(frozen=True)
class PretrainedMlm:
    root: Path
    uri: str
    figures: dict
    export_dir: Path


def run_mlm_stages(root: Path, mlm: MlmConfig) -> tuple[dict, Path]:
    """The four MLM stages, as `dvc repro export_mlm` runs them, into `root`."""
    from pipelines.selfsupervised.export import export_mlm
    from pipelines.selfsupervised.ingest_corpus import ingest_corpus
    from pipelines.selfsupervised.prepare import prepare_mlm
    from pipelines.selfsupervised.pretrain import pretrain_mlm

    ingest_corpus(mlm, str(root / "raw"))
    prepare_mlm(mlm, str(root / "raw"), str(root / "prepared"))
    figures = pretrain_mlm(
        mlm,
        str(root / "prepared"),
        str(root / "model"),
        str(root / "mlm.json"),
        str(root / "plots"),
    )
    export_mlm(
        ExportConfig(),
        mlm,
        str(root / "prepared"),
        str(root / "model"),
        str(root / "mlm.json"),
        str(root / "export"),
        str(root / "mlm_export.json"),
    )
    return figures, root / "export"


@pytest.fixture(scope="module")
def pretrained(ray_cluster, tmp_path_factory) -> PretrainedMlm:
    """The built-in corpus and the default encoder, trained for a short CI-sized run."""
    root = tmp_path_factory.mktemp("mlm")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlm = MlmConfig(
        train=dataclasses.replace(
            MlmConfig().train, epochs=5, warmup_epochs=1, early_stopping_patience=0
        )
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)
        env.setenv("DLPIPE_STORAGE", str(root / "checkpoints"))
        figures, export_dir = run_mlm_stages(root, mlm)
    return PretrainedMlm(root, uri, figures, export_dir)


def test_pretraining_beats_the_unigram_model(pretrained):
    figures = pretrained.figures
    assert figures["epochs_run"] == 5
    assert figures["perplexity"] < figures["unigram_perplexity"]
    assert figures["masked_accuracy"] > figures["baseline_masked_accuracy"]
    parity = json.loads((pretrained.root / "mlm_export.json").read_text())
    assert parity["onnx_max_abs_diff"] < 1e-3 and parity["onnx_argmax_agreement"] == 1.0


def test_a_users_folder_of_text_files_trains_through_the_same_stages(ray_cluster, tmp_path, stores):
    stores()
    rng = random.Random(0)
    subjects = ["the cat", "a dog", "my neighbour", "the old farmer", "our teacher"]
    verbs = ["sees", "feeds", "paints", "follows", "greets"]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for n in range(40):
        sentences = [
            f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(subjects)}." for _ in range(6)
        ]
        (corpus / f"doc{n:02d}.txt").write_text(" ".join(sentences))
    mlm = MlmConfig(
        source=str(corpus),
        vocab_size=64,
        model=EncoderConfig(layers=1, width=32, heads=2, ffn_width=64, max_length=32),
        train=TrainConfig(epochs=2, batch_size=8, optimizer="adamw", lr=0.003, num_workers=1),
        registered_model="test-user-mlm",
    )
    figures, export_dir = run_mlm_stages(tmp_path, mlm)
    manifest = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 40
    assert figures["epochs_run"] == 2 and np.isfinite(figures["perplexity"])
    card = json.loads((export_dir / "model_card.json").read_text())
    assert card["name"] == "test-user-mlm" and card["max_length"] == 32


@pytest.fixture(scope="module")
def server(pretrained, ray_dashboard):
    with served_app(
        ray_dashboard,
        "dlpipe-mlm-test",
        {
            "model": "none",
            "mlm_model": "models:/dlpipe-mlm@champion",
            "tracking_uri": pretrained.uri,
        },
    ) as client:
        yield client


def corpus_sentences(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """(sentence with one word replaced by [MASK], that word): plain lowercase words of
    sentences from the built-in corpus, chosen with a fixed seed."""
    from pipelines.selfsupervised.corpus import builtin_documents

    rng = random.Random(seed)
    sentences = [
        s.strip()
        for d in builtin_documents()
        for s in d.replace("\n", " ").split(". ")
        if 6 <= len(s.split()) <= 25
    ]
    chosen = []
    for sentence in rng.sample(sentences, len(sentences)):
        words = sentence.split()
        candidates = [i for i, w in enumerate(words) if w.isalpha() and w.islower()]
        if not candidates:
            continue
        i = rng.choice(candidates)
        chosen.append((" ".join([*words[:i], "[MASK]", *words[i + 1 :]]), words[i]))
        if len(chosen) == count:
            break
    return chosen


def test_fill_mask_ranks_the_missing_word_higher_than_the_baseline(server, pretrained):
    cases = corpus_sentences(60)
    response = server.post("/v1/fill-mask", json={"texts": [t for t, _ in cases], "top_k": 5})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    # Words the tokenizer splits into pieces cannot be one token's answer: score whole words.
    model_hits = baseline_hits = scored = 0
    vocab = json.loads((pretrained.export_dir / "tokenizer.json").read_text())["model"]["vocab"]
    frequent = frequent_tokens(pretrained, 5)
    for (_, word), result in zip(cases, results):
        if word not in vocab:
            continue
        scored += 1
        [mask] = result["masks"]
        model_hits += word in [p["token"] for p in mask["predictions"]]
        baseline_hits += word in frequent
    assert scored >= 30
    assert model_hits > baseline_hits, (model_hits, baseline_hits, scored)


def frequent_tokens(pretrained: PretrainedMlm, k: int) -> list[str]:
    """The most-frequent-token baseline's top k: the commonest training tokens."""
    from tokenizers import Tokenizer

    from pipelines.selfsupervised.figures import token_counts

    manifest = json.loads((pretrained.root / "prepared" / "manifest.json").read_text())
    blocks = np.load(pretrained.root / "prepared" / "x_train.npy")
    counts = token_counts(blocks, manifest["vocab_size"], list(manifest["special_ids"].values()))
    tokenizer = Tokenizer.from_file(str(pretrained.export_dir / "tokenizer.json"))
    return [tokenizer.id_to_token(int(i)) for i in np.argsort(-counts)[:k]]


def test_embed_returns_unit_vectors_independent_of_batch_padding(server):
    texts = ["the assert statement", "a much longer text about the import system of python"]
    together = server.post("/v1/embed", json={"texts": texts}).json()
    alone = server.post("/v1/embed", json={"texts": texts[:1]}).json()
    vectors = np.array(together["embeddings"])
    assert vectors.shape == (2, 128)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.allclose(vectors[0], alone["embeddings"][0], atol=1e-5)
    assert together["truncated"] == [False, False]
    long = server.post("/v1/embed", json={"texts": ["word " * 500]}).json()
    assert long["truncated"] == [True]
    [model] = server.get("/v1/models").json()["models"]
    assert model["name"] == "dlpipe-mlm" and model["max_length"] == 64


def test_concurrent_embed_requests_batched_together_each_get_their_own_answer(server):
    """Concurrent /v1/embed requests go through one onnxruntime call (serving/app.py's
    batcher), padded to the longest text among them: each answer is still what that
    request alone gets, and one request's empty text fails it alone."""
    words = "the import system of python reads modules from the path".split()
    bodies = [
        {"texts": [" ".join(words[: 1 + (i + j) % 10]) for j in range(1 + i % 3)]}
        for i in range(40)
    ]
    bodies[7] = {"texts": ["a text", "   "]}
    alone = {
        i: server.post("/v1/embed", json=body).json() for i, body in enumerate(bodies) if i != 7
    }
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda body: server.post("/v1/embed", json=body), bodies))
    assert answers[7].status_code == 422
    assert answers[7].json()["detail"][0]["loc"] == ["body", "texts", "1"]
    for i, answer in enumerate(answers):
        if i != 7:
            assert answer.status_code == 200, answer.text
            assert np.allclose(answer.json()["embeddings"], alone[i]["embeddings"], atol=1e-5)


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/fill-mask", {"texts": ["no mask here"]}, "no [MASK]"),
        ("/v1/fill-mask", {"texts": ["   "]}, "empty"),
        ("/v1/fill-mask", {"texts": ["[MASK] " + "word " * 200]}, "tokens long"),
        ("/v1/fill-mask", {"texts": []}, "at least 1"),
        ("/v1/fill-mask", {"texts": ["a [MASK]"], "top_k": 0}, "greater than"),
        ("/v1/embed", {"texts": [""]}, "empty"),
        ("/v1/embed", {"text": "wrong field"}, "texts"),
        ("/v1/classify", {"instances": [[0.0] * 64]}, "no classifier"),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_problem(server, path, body, message):
    response = server.post(path, json=body)
    assert 400 <= response.status_code < 500, response.text
    assert message in response.text
    assert server.get("/healthz").status_code == 200


def test_non_utf8_body_is_a_client_error(server):
    response = server.post(
        "/v1/embed",
        content=b'{"texts": ["caf\xe9"]}',
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert "UTF-8" in response.json()["detail"]
    assert server.post("/v1/embed", json={"texts": ["café"]}).status_code == 200
