"""End to end: the three Prefect flows on the demo corpus, training as a real Ray job on a local Ray head."""

from pathlib import Path

import jsonschema
import pytest
import yaml
from generators.data import broken_corpus, odd_scenes
from PIL import Image
from prefect.exceptions import ParameterTypeError

from pipelines.index import index_archive
from pipelines.ingest import ingest_archive_flow, ingest_corpus_flow, ingest_flow
from pipelines.train import MissingDataError, train_msa
from rsitr.evaluation.metrics import chance_metrics
from rsitr.io.geotiff import TileOptions
from rsitr.retrieval.search import Searcher

PROJECT = Path(__file__).resolve().parents[2]


def test_prefect_yaml_declares_the_deployments() -> None:
    spec = yaml.safe_load((PROJECT / "prefect.yaml").read_text())
    names = set()
    for deployment in spec["deployments"]:
        path, func = deployment["entrypoint"].split(":")
        module = __import__(path.removesuffix(".py").replace("/", "."), fromlist=[func])
        flow = getattr(module, func)
        names.add(f"{flow.name}/{deployment['name']}")
        assert set(deployment.get("parameters", {})) <= set(flow.parameters.properties), deployment
        # the parameters the server will validate on every run: the flow's own JSON schema
        schema = flow.parameters.model_dump(mode="json", by_alias=True)
        jsonschema.validate(deployment.get("parameters", {}), schema)
    assert {
        "ingest/demo",
        "ingest-corpus/rsicd",
        "ingest-archive/geotiff-samples",
        "train-msa/demo",
        "train-msa/rsitmd",
        "train-msa/rsicd",
        "index-archive/demo",
        "index-archive/nightly",
    } <= names
    nightly = next(d for d in spec["deployments"] if d["name"] == "nightly")
    assert nightly["schedules"][0]["cron"]


@pytest.mark.prefect
def test_ingest_corpus_and_archive_flows_run(prefect_harness: None, tmp_path: Path) -> None:
    images, captions = broken_corpus(tmp_path / "corpus")
    corpus = ingest_corpus_flow(
        images=str(images), captions=[str(captions)], dataset="bad", out=str(tmp_path), workers=1
    )
    assert corpus == {"data": str(tmp_path / "bad"), "rows": 3, "skipped": 0, "quarantined": 9}
    odd_scenes(tmp_path / "scenes")
    scenes = [str(tmp_path / "scenes")]
    archive = ingest_archive_flow(scenes=scenes, out=str(tmp_path), options=TileOptions(tile_size=64), workers=1)
    assert archive["rows"] == 11 and archive["quarantined"] == 2 and archive["skipped"] == 13
    as_a_deployment_passes_it = {"tile_size": 64}
    again = ingest_archive_flow(scenes=scenes, out=str(tmp_path), options=as_a_deployment_passes_it, workers=1)  # type: ignore[arg-type]
    assert again == archive  # the same ingest: nothing to do
    with pytest.raises(ParameterTypeError, match="edge mode .wrap. is not one of pad, drop"):  # before it runs
        ingest_archive_flow(scenes=scenes, out=str(tmp_path), options={"edge": "wrap"})  # type: ignore[arg-type]


@pytest.mark.prefect
def test_train_on_missing_data_fails_at_once_saying_what_to_ingest(prefect_harness: None, tmp_path: Path) -> None:
    with pytest.raises(MissingDataError, match=r"rsitr ingest corpus .* --dataset rsitmd"):
        train_msa(data=str(tmp_path / "data" / "rsitmd"))


@pytest.mark.prefect
@pytest.mark.ray
def test_ingest_train_index_search_end_to_end(
    prefect_harness: None, ray_local: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ingested = ingest_flow(source="demo", dataset="demo", out=str(tmp_path / "data"))
    assert ingested["rows"] == 432 and ingested["quarantined"] == 0
    result = train_msa(
        data=ingested["data"],
        config="demo",
        storage_path=str(tmp_path / "runs"),
        name="e2e",
        epochs=2,
    )
    history = result["history"]
    assert len(history) == 2
    run_dir = tmp_path / "runs" / "e2e"
    with Image.open(run_dir / "training_curve.png") as curve:
        assert curve.size == (600, 350)
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    test = result["test"]
    chance = chance_metrics(int(test["images"]), test["captions"] / test["images"])
    assert test["mR"] > chance["mR"] + 8, (test, chance)
    indexed = index_archive(
        checkpoint=str(tmp_path / "runs"), data=ingested["data"], out=str(tmp_path / "index"), captions=True
    )
    assert indexed["rows"] == 432 and indexed["caption_rows"] >= 432
    searcher = Searcher(str(tmp_path / "index"))
    hits = searcher.search("a river crosses dense forest", k=5)
    assert len(hits) == 5 and hits[0].footprint
    reranked = searcher.search("a river crosses dense forest", k=5, rerank=20)
    scores = [h.rerank_score for h in reranked if h.rerank_score is not None]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True)  # re-ranked, in the re-ranked order
