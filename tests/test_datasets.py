"""Tests for factrace.study.datasets: offline against ../shared/data, downloads against a local HTTP server."""
from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import threading
from functools import partial
from pathlib import Path

import pytest

from factrace.study import datasets as ds
from factrace.study.datasets import ChecksumError, DatasetDownloadError, FactRecord, SubjectNotInPromptError, check_records, load_counterfact, load_dataset, load_facts, load_known_1000, load_relations

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "known_1000.json").exists(), reason="../shared/data absent")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """Never touch the user's cache or a real FACTRACE_DATA_DIR."""
    monkeypatch.setenv("FACTRACE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FACTRACE_DATA_DIR", raising=False)
    monkeypatch.delenv("FACTRACE_COUNTERFACT_URL", raising=False)


# --------------------------------------------------------------------------------------------------
# Shared data, offline
# --------------------------------------------------------------------------------------------------

@needs_shared
def test_known_1000():
    recs = load_known_1000(SHARED)
    assert len(recs) == 1209
    r = recs[0]
    assert isinstance(r, FactRecord) and r.source == "known_1000"
    assert r.subject == "Vinson Massif" and r.relation == "P30" and r.object == "Antarctica"
    assert r.prompt == "Vinson Massif is located in the continent of"
    assert r.template == "{} is located in the continent"
    assert r.extra["known_id"] == 0 and "prediction" in r.extra
    assert r.target == " Antarctica"
    assert len({x.relation for x in recs}) == 33
    assert check_records(recs) == []


@needs_shared
def test_known_1000_file_path_and_env(monkeypatch):
    a = load_known_1000(SHARED / "known_1000.json")
    monkeypatch.setenv("FACTRACE_DATA_DIR", str(SHARED))
    b = load_known_1000(download=False)
    assert a == b


@needs_shared
def test_known_1000_frame():
    df = load_known_1000(SHARED, as_frame=True)
    assert df.shape[0] == 1209
    for col in ("subject", "relation", "prompt", "object", "template", "source", "known_id", "prediction"):
        assert col in df.columns


@needs_shared
def test_relations_all():
    recs = load_relations(SHARED)
    assert len(recs) == 11089
    assert len({r.relation for r in recs}) == 47
    assert {r.extra["relation_type"] for r in recs} == {"factual", "commonsense", "linguistic", "bias"}
    assert not [r for r in recs if "\\u" in r.object or "\\u" in r.subject]
    assert check_records(recs) == []
    for r in recs[:50]:
        assert r.prompt == r.template.replace("{}", r.subject)
    # the same through the relations/ folder itself
    assert len(load_relations(SHARED / "relations", relation_type="linguistic")) == \
        sum(1 for r in recs if r.extra["relation_type"] == "linguistic")


@needs_shared
def test_relations_unicode_decoded():
    recs = load_relations(SHARED, names="country_capital_city")
    by = {r.subject: r.object for r in recs}
    assert by["Brazil"] == "Brasília"
    assert by["Colombia"] == "Bogotá"
    assert recs[0].relation_name == "country capital city"
    one = load_relations(SHARED / "relations" / "factual" / "country_capital_city.json")
    assert [r.object for r in one] == [r.object for r in recs]


@needs_shared
def test_relations_templates_and_errors():
    first = load_relations(SHARED, names=["country_capital_city"])
    every = load_relations(SHARED, names="country_capital_city", templates="all")
    assert len(every) == 2 * len(first)
    assert {r.extra["template_index"] for r in every} == {0, 1}
    zs = load_relations(SHARED, names="country_capital_city", zero_shot=True)
    assert zs[0].template == "The capital of {} is the city of"
    assert check_records(load_relations(SHARED, templates="all")) == []
    with pytest.raises(ValueError, match="unknown relation"):
        load_relations(SHARED, names="no_such_relation")
    with pytest.raises(ValueError):
        load_relations(SHARED, names="country_capital_city", templates="some")


def test_relation_file_list():
    assert len(ds.RELATION_FILES) == 47
    assert all(ds.URLS["relations/" + f].startswith(ds.RELATIONS_BASE) for f in ds.RELATION_FILES)


@needs_shared
def test_counterfact_splits():
    recs = load_counterfact(SHARED)
    assert len(recs) == 21919
    ids = {s: {r.extra["case_id"] for r in recs if r.extra["split"] == s} for s in ("train", "val", "edit")}
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["edit"]) and not (ids["val"] & ids["edit"])
    val = load_counterfact(SHARED, split="val")
    assert len(val) == len(ids["val"])
    r = val[0]
    assert (r.subject, r.prompt, r.object, r.relation) == ("BBC One", "BBC One, by", "BBC", None)
    assert r.extra["target_new"] == "Sega" and r.extra["locality_ground_truth"] == "BBC"
    assert check_records(recs) == []
    assert len(load_counterfact(SHARED / "counterfact" / "counterfact-val.json", split="val")) == len(val)
    with pytest.raises(ValueError, match="valid"):
        load_counterfact(SHARED, split="test")


def test_counterfact_full_format(tmp_path):
    case = {"case_id": 0, "pararel_idx": 2796,
            "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                                  "target_new": {"str": "English", "id": "Q1860"},
                                  "target_true": {"str": "French", "id": "Q150"}, "subject": "Danielle Darrieux"},
            "paraphrase_prompts": ["x"], "neighborhood_prompts": ["y"], "attribute_prompts": ["z"],
            "generation_prompts": ["w"]}
    (tmp_path / "counterfact.json").write_text(json.dumps([case]))
    (r,) = load_counterfact(tmp_path, split="full")
    assert r.prompt == "The mother tongue of Danielle Darrieux is"
    assert (r.relation, r.object, r.extra["target_new"]) == ("P103", "French", "English")
    assert r.extra["paraphrase_prompts"] == ["x"]


@needs_shared
def test_load_dataset_dispatch():
    assert len(load_dataset("known_1000", SHARED)) == 1209
    assert len(load_dataset("LRE", SHARED, names="country_capital_city")) == \
        len(load_dataset("relations", SHARED, names="country_capital_city"))
    assert len(load_dataset("counterfact", SHARED, split="edit")) > 0
    assert load_dataset("counterfact", SHARED, split="val", as_frame=True).shape[0] > 0


def test_load_dataset_unknown_name():
    with pytest.raises(ValueError) as exc:
        load_dataset("wikidata")
    for name in ("known_1000", "relations", "lre", "counterfact", "facts"):
        assert name in str(exc.value)


def test_fetch_missing_without_download():
    with pytest.raises(FileNotFoundError, match="download=False"):
        load_known_1000(download=False)


# --------------------------------------------------------------------------------------------------
# facts.jsonl
# --------------------------------------------------------------------------------------------------

def test_facts():
    recs = load_dataset("facts")
    assert 95 <= len(recs) <= 130
    rels = {r.relation for r in recs}
    assert len(rels) == 10
    cands = ds.facts_candidates()
    assert set(cands) == rels
    for r in recs:
        assert r.prompt.startswith("Fact: ") and not r.prompt.endswith(" ")
        assert r.subject in r.prompt
        assert r.prompt == r.template.replace("{}", r.subject)
        assert r.object in r.extra["candidates"] and r.object not in r.extra["distractors"]
        assert r.object == r.object.strip() and r.target == " " + r.object
        assert len(r.extra["distractors"]) >= 2
    for rel, c in cands.items():
        assert len(c) == len(set(c)), rel
        assert sum(r.relation == rel for r in recs) >= 8
    assert len({(r.relation, r.subject) for r in recs}) == len(recs)
    colosseum = [r for r in recs if r.subject == "The Colosseum"][0]
    assert colosseum.prompt == "Fact: The Colosseum is in the country of" and colosseum.object == "Italy"
    assert check_records(recs) == []
    df = load_facts(relations="country_capital", as_frame=True)
    assert set(df["relation"]) == {"country_capital"} and "candidates" in df.columns
    with pytest.raises(ValueError, match="unknown relation"):
        load_facts(relations="nope")


# --------------------------------------------------------------------------------------------------
# check_records
# --------------------------------------------------------------------------------------------------

def test_check_records():
    good = FactRecord("Paris", "r", "Paris is in", "France")
    bad = FactRecord("Rome", "r", "The city of rome is in", "Italy")
    assert check_records([good]) == []
    assert check_records([good, bad], raise_on_error=False) == [(1, bad)]
    assert check_records([good, bad], case_sensitive=False) == []
    with pytest.raises(SubjectNotInPromptError, match="'Rome' not in prompt"):
        check_records([good, bad])
    assert check_records([{"subject": "x", "prompt": "y"}], raise_on_error=False)[0][0] == 0
    empty = FactRecord("", "r", "abc", "d")
    assert check_records([empty], raise_on_error=False)
    import pandas as pd
    df = pd.DataFrame([good.to_dict(), bad.to_dict()])
    assert [i for i, _ in check_records(df, raise_on_error=False)] == [1]


# --------------------------------------------------------------------------------------------------
# Downloads against a local HTTP server
# --------------------------------------------------------------------------------------------------

class _Server:
    def __init__(self, root: Path):
        self.root = root
        self.requests: list[str] = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "srv"
    root.mkdir()
    s = _Server(root)
    yield s
    s.close()


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _no_temp_files(folder: Path):
    return not [p for p in folder.rglob("*") if p.name.endswith(".part")]


def test_download_ok_and_atomic(server, tmp_path):
    body = b'[{"a": 1}]' * 1000
    (server.root / "f.json").write_bytes(body)
    dest = tmp_path / "out" / "sub" / "f.json"
    got = ds.download(server.url + "f.json", dest, sha256=_sha(body))
    assert got == dest and dest.read_bytes() == body
    assert _no_temp_files(tmp_path / "out")
    # already there and valid: no second request
    ds.download(server.url + "f.json", dest, sha256=_sha(body))
    assert server.requests == ["/f.json"]


def test_download_checksum_mismatch(server, tmp_path):
    (server.root / "f.json").write_bytes(b"tampered")
    dest = tmp_path / "out" / "f.json"
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        ds.download(server.url + "f.json", dest, sha256=_sha(b"original"))
    assert not dest.exists()
    assert _no_temp_files(tmp_path / "out")
    # a valid existing file is left untouched by a failed forced re-download
    dest.write_bytes(b"original")
    with pytest.raises(ChecksumError):
        ds.download(server.url + "f.json", dest, sha256=_sha(b"original"), force=True)
    assert dest.read_bytes() == b"original"
    assert _no_temp_files(tmp_path / "out")


def test_download_404(server, tmp_path):
    dest = tmp_path / "out" / "missing.json"
    with pytest.raises(DatasetDownloadError, match="404"):
        ds.download(server.url + "missing.json", dest)
    assert not dest.exists() and _no_temp_files(tmp_path / "out")


def test_download_offline(tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(DatasetDownloadError, match="offline") as exc:
        ds.download(f"http://127.0.0.1:{port}/x.json", tmp_path / "x.json", timeout=5)
    assert "FACTRACE_DATA_DIR" in str(exc.value)
    assert not (tmp_path / "x.json").exists()


def _known_like():
    return [{"known_id": i, "subject": f"Subj {i}", "attribute": "Obj", "template": "{} is in",
             "prediction": " Obj", "prompt": f"Subj {i} is in", "relation_id": "P1"} for i in range(3)]


def test_fetch_caches_and_redownloads_corrupt(server, monkeypatch, tmp_path):
    body = json.dumps(_known_like()).encode()
    (server.root / "known_1000.json").write_bytes(body)
    monkeypatch.setitem(ds.URLS, "known_1000.json", server.url + "known_1000.json")
    monkeypatch.setitem(ds.SHA256, "known_1000.json", _sha(body))
    recs = load_known_1000()
    assert [r.subject for r in recs] == ["Subj 0", "Subj 1", "Subj 2"]
    cached = tmp_path / "cache" / "known_1000.json"
    assert cached.read_bytes() == body
    load_known_1000()
    load_dataset("known_1000", as_frame=True)
    assert server.requests == ["/known_1000.json"]  # cached: no second download
    cached.write_bytes(b"corrupt")
    assert len(load_known_1000()) == 3  # bad checksum in the cache -> downloaded again
    assert len(server.requests) == 2 and cached.read_bytes() == body
    # verify=False accepts a cached file whatever its checksum
    cached.write_bytes(json.dumps(_known_like()[:1]).encode())
    assert len(load_known_1000(verify=False)) == 1
    assert len(server.requests) == 2


def test_fetch_checksum_error_from_loader(server, monkeypatch):
    (server.root / "known_1000.json").write_bytes(json.dumps(_known_like()).encode())
    monkeypatch.setitem(ds.URLS, "known_1000.json", server.url + "known_1000.json")
    monkeypatch.setitem(ds.SHA256, "known_1000.json", "0" * 64)
    with pytest.raises(ChecksumError):
        load_known_1000()
    assert len(load_known_1000(verify=False)) == 3


@needs_shared
def test_download_real_files(server, monkeypatch, tmp_path):
    """The real checksums of the manifest verify real copies served over HTTP."""
    shutil.copy(SHARED / "known_1000.json", server.root / "known_1000.json")
    (server.root / "cf").mkdir()
    shutil.copy(SHARED / "counterfact" / "counterfact-val.json", server.root / "cf" / "counterfact-val.json")
    (server.root / "rel" / "factual").mkdir(parents=True)
    shutil.copy(SHARED / "relations" / "factual" / "country_capital_city.json", server.root / "rel" / "factual")
    monkeypatch.setitem(ds.URLS, "known_1000.json", server.url + "known_1000.json")
    monkeypatch.setitem(ds.URLS, "relations/factual/country_capital_city.json",
                        server.url + "rel/factual/country_capital_city.json")
    assert len(load_known_1000()) == 1209
    val = load_counterfact(split="val", base_url=server.url + "cf")
    assert val == load_counterfact(SHARED, split="val")
    monkeypatch.setenv("FACTRACE_COUNTERFACT_URL", server.url + "cf/")
    assert len(load_counterfact(split="val")) == len(val)
    recs = load_relations(names="country_capital_city")
    assert {r.subject: r.object for r in recs}["Brazil"] == "Brasília"
    assert sorted(server.requests) == ["/cf/counterfact-val.json", "/known_1000.json",
                                       "/rel/factual/country_capital_city.json"]
    assert (tmp_path / "cache" / "relations" / "factual" / "country_capital_city.json").exists()
