"""factrace.load("org/name") finds a repo in a (fake) local Hugging Face hub cache offline (HF_HUB_OFFLINE=1).

Since factrace downloads from the Hub (tests/test_hub_download.py), these cache-only cases run offline: online,
a repo id is first checked against the Hub (as transformers does), and these tests must not reach it.
"""
import hashlib
import os
import shutil

import numpy as np
import pytest

import factrace
from factrace import HubError
from factrace.io.load import hf_cache_dir, resolve_repo_id

from conftest import FIXTURES, expected

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD = "fedcba9876543210fedcba9876543210fedcba98"


def make_repo(hub, repo_id, fixture="gpt2", commit=COMMIT, ref="main", blobs=True):
    """The hub layout: models--org--name/{refs/<ref>, blobs/<sha256>, snapshots/<commit>/<file> -> blob}."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted((FIXTURES / fixture).iterdir()):
        if f.name == "expected.npz":
            continue
        if blobs:  # like huggingface_hub: snapshot entries are relative symlinks into blobs/
            sha = hashlib.sha256(f.read_bytes()).hexdigest()
            blob = repo / "blobs" / sha
            shutil.copyfile(f, blob)
            (snap / f.name).symlink_to(os.path.relpath(blob, snap))
        else:
            shutil.copyfile(f, snap / f.name)
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return repo


@pytest.fixture
def hub(tmp_path, monkeypatch):
    hub = tmp_path / "hfhome" / "hub"
    hub.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # "org/name" must not resolve as a relative directory
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


def _check_runs_like_fixture(m, fixture="gpt2"):
    e = expected(fixture)
    r = m.run(e["p0_ids"])
    assert np.abs(r.logits - e["p0_logits"]).max() <= 1e-4


def test_load_repo_id_from_cache(hub):
    make_repo(hub, "org/name")
    m = factrace.load("org/name")
    assert m.name == "org/name"
    assert m.source.endswith(os.path.join("snapshots", COMMIT))
    _check_runs_like_fixture(m)
    assert m.encode("The capital of France is").size > 0


def test_hf_home_only(hub, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE")
    assert hf_cache_dir() == tmp_path / "hfhome" / "hub"
    make_repo(hub, "org/name", fixture="llama_gqa2_tied", blobs=False)
    m = factrace.load("org/name")
    _check_runs_like_fixture(m, "llama_gqa2_tied")


def test_hub_cache_wins_over_hf_home(hub, monkeypatch, tmp_path):
    other = tmp_path / "other_hub"
    other.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(other))
    make_repo(other, "org/name", fixture="qwen3")
    make_repo(hub, "org/name", fixture="gpt2")  # under HF_HOME: must not be used
    m = factrace.load("org/name")
    assert m.config.arch == "Qwen3ForCausalLM"


def test_refs_main_picks_the_snapshot(hub):
    repo = make_repo(hub, "org/name", fixture="qwen2", commit=OLD, ref=None)
    make_repo(hub, "org/name", fixture="gpt2", commit=COMMIT)  # refs/main -> COMMIT
    # make the unreferenced snapshot the newest: refs/main must still win
    now = os.path.getmtime(repo / "snapshots" / COMMIT) + 100
    os.utime(repo / "snapshots" / OLD, (now, now))
    assert resolve_repo_id("org/name").name == COMMIT
    assert factrace.load("org/name").config.arch == "GPT2LMHeadModel"
    assert resolve_repo_id("org/name", revision=OLD).name == OLD


def test_no_refs_uses_a_snapshot(hub):
    make_repo(hub, "org/name", ref=None)
    assert resolve_repo_id("org/name").name == COMMIT
    _check_runs_like_fixture(factrace.load("org/name"))


def test_dotted_and_dashed_repo_ids(hub):
    make_repo(hub, "Some-Org/model.v1_2-x", fixture="mistral")
    assert factrace.load("Some-Org/model.v1_2-x").config.arch == "MistralForCausalLM"


def test_missing_repo_offline(hub):
    # was FileNotFoundError "factrace never downloads": offline, an uncached repo is now a HubError (a
    # CheckpointError, like every other Hub failure) saying it is offline and how to fetch
    make_repo(hub, "org/name")
    with pytest.raises(HubError) as ei:
        factrace.load("org/other-model")
    msg = str(ei.value)
    assert "org/other-model" in msg
    assert "not in the Hugging Face cache" in msg
    assert str(hub) in msg
    assert "offline" in msg and "hf download org/other-model" in msg


def test_missing_repo_empty_cache(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "does_not_exist"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="offline"):
        factrace.load("openai-community/gpt2")


def test_repo_without_snapshots(hub):
    repo = hub / "models--org--name"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    with pytest.raises(HubError) as ei:  # was FileNotFoundError (see test_missing_repo_offline)
        factrace.load("org/name")
    msg = str(ei.value)
    assert "org/name" in msg and ("no snapshot" in msg or "not in the cache" in msg)


def test_snapshot_missing_weights_is_a_checkpoint_error(hub):
    repo = make_repo(hub, "org/name")
    (repo / "snapshots" / COMMIT / "model.safetensors").unlink()
    with pytest.raises(factrace.CheckpointError, match="safetensors"):
        factrace.load("org/name")


def test_local_directory_wins_over_cache(hub, tmp_path):
    make_repo(hub, "org/name", fixture="gpt2")
    local = tmp_path / "org" / "name"
    shutil.copytree(FIXTURES / "qwen3", local)
    assert factrace.load("org/name").config.arch == "Qwen3ForCausalLM"
