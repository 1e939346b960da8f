"""factrace.load("org/name") downloads from the Hub like transformers, tested fully offline against the local
stand-in Hub of tests/hub_server.py (HF_ENDPOINT points at it; a temporary HF_HUB_CACHE; any attempt to
resolve a host other than 127.0.0.1 fails the test)."""
import json
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import factrace
from factrace import CheckpointError, ConfigError
from factrace import HubError

from conftest import FIXTURES, ROOT, expected, fixture_model
from hub_server import HubServer

ALICE, BOB = "hf_alice_token", "hf_bob_token"  # alice has access to the gated repo, bob does not
WEIGHTS = (".safetensors", ".gguf", ".bin")


def _tiny_gguf(quant="F32") -> bytes:
    if str(ROOT / "fuzz") not in sys.path:
        sys.path.insert(0, str(ROOT / "fuzz"))
    from make_corpus import tiny_llama_gguf

    return tiny_llama_gguf(quant)


def _files(fixture) -> dict:
    return {p.name: p.read_bytes() for p in sorted((FIXTURES / fixture).iterdir()) if p.name != "expected.npz"}


@pytest.fixture(scope="module")
def server():
    with HubServer(tokens={ALICE: "alice", BOB: "bob"}) as s:
        s.commits = {}
        s.commits["tiny_v0"] = s.add_repo("org/tiny", FIXTURES / "llama_gqa2_tied", refs=("v0",))
        s.commits["tiny"] = s.add_repo("org/tiny", FIXTURES / "gpt2")               # main
        s.add_repo("org/sharded", FIXTURES / "llama_sharded")
        s.gguf = {"tiny-F32.gguf": _tiny_gguf("F32"), "tiny-F16.gguf": _tiny_gguf("F16")}
        s.add_repo("org/gguf", {**s.gguf, "README.md": b"# tiny GGUF\n"})
        s.add_repo("org/gated", FIXTURES / "gpt2", gated=True, allowed={"alice"})
        s.add_repo("org/private", FIXTURES / "gpt2", private=True, allowed={"alice"})
        bert = _files("gpt2")
        bert["config.json"] = json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert",
                                          "hidden_size": 32, "num_hidden_layers": 2}).encode()
        s.add_repo("org/bert", bert)
        binonly = _files("gpt2")
        binonly["pytorch_model.bin"] = binonly.pop("model.safetensors")
        s.add_repo("org/binonly", binonly)
        bad = _files("llama_sharded")
        index = json.loads(bad["model.safetensors.index.json"])
        first = next(iter(index["weight_map"]))
        index["weight_map"][first] = "../evil.safetensors"
        bad["model.safetensors.index.json"] = json.dumps(index).encode()
        s.add_repo("org/badindex", bad)
        short = _files("llama_sharded")
        index = json.loads(short["model.safetensors.index.json"])
        s.absent_shard = index["weight_map"][next(iter(index["weight_map"]))]
        del short[s.absent_shard]
        s.add_repo("org/shortindex", short)
        s.add_repo("org/liar", FIXTURES / "gpt2", hidden={"tokenizer.json"})  # listed, but 404 on resolve
        yield s


def _closed_port() -> int:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


@pytest.fixture
def hub(server, tmp_path, monkeypatch):
    """HF_ENDPOINT -> the stand-in Hub, an empty HF_HUB_CACHE, no token, online; returns the server."""
    import huggingface_hub.constants as hfc
    from huggingface_hub.utils import _detect_agent

    server.clear()
    monkeypatch.chdir(tmp_path)  # "org/name" must not resolve as a relative directory
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                "HUGGINGFACE_HUB_CACHE", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "5")
    # what huggingface_hub read at import: short download timeout, not offline, no saved token, and no
    # telemetry fetch of the agent-harness registry from its import-time endpoint. (constants.ENDPOINT is left
    # alone: hf_hub_url swaps the import-time endpoint for the endpoint= argument only when they match.)
    monkeypatch.setattr(hfc, "HF_HUB_DOWNLOAD_TIMEOUT", 5)
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hfc, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(_detect_agent, "_registry", {"standardEnvVars": [], "harnesses": {}})
    # nothing may try to reach another host (huggingface.co): refuse name resolution of anything else
    real_getaddrinfo, foreign = socket.getaddrinfo, []

    def guarded(host, *a, **k):
        if host not in ("127.0.0.1", "localhost", b"127.0.0.1"):
            foreign.append(host)
            raise socket.gaierror(f"test: no network to {host!r}")
        return real_getaddrinfo(host, *a, **k)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)
    server.cache = tmp_path / "hub"
    yield server
    assert not foreign, f"tried to reach {foreign}"


def _same_logits(m, ref, ids=None):
    ids = expected("gpt2")["p0_ids"] if ids is None else ids
    a, b = m.run(ids).logits, ref.run(ids).logits
    assert np.array_equal(a, b)


def _offline(monkeypatch, server=None):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")  # and nothing to talk to
    if server is not None:
        server.clear()


def _weights_requested(server) -> list:
    return [f for f in server.fetched() if f.endswith(WEIGHTS)]


# ---------------------------------------------------------------- downloads

def test_download_tiny_then_offline(hub, monkeypatch):
    m = factrace.load("org/tiny")
    assert m.name == "org/tiny" and m.config.arch == "GPT2LMHeadModel"
    _same_logits(m, fixture_model("gpt2"))
    assert np.abs(m.run(expected("gpt2")["p0_ids"]).logits - expected("gpt2")["p0_logits"]).max() <= 1e-4
    assert m.encode("The capital of France is").size > 0
    assert sorted(hub.downloaded()) == sorted(["config.json", "tokenizer.json", "tokenizer_config.json",
                                               "generation_config.json", "model.safetensors"])
    fetched = hub.fetched()
    assert fetched[0] == "config.json"          # before anything else
    snap = Path(m.source)
    assert snap.parent.name == "snapshots" and snap.name == hub.commits["tiny"]
    assert snap.is_relative_to(hub.cache)
    assert (hub.cache / "models--org--tiny" / "refs" / "main").read_text() == hub.commits["tiny"]
    # every file request used the commit the revision resolved to
    assert all(r.path.split("/resolve/")[1].startswith(hub.commits["tiny"] + "/")
               for r in hub.requests if "/resolve/" in r.path)

    _offline(monkeypatch, hub)
    m2 = factrace.load("org/tiny")
    assert hub.requests == []
    assert m2.source == m.source
    _same_logits(m2, m)


def test_second_online_load_uses_the_cache(hub):
    factrace.load("org/tiny")
    hub.clear()
    factrace.load("org/tiny")
    assert [r.path for r in hub.requests] == ["/api/models/org/tiny"]  # the commit is checked, no file re-fetched


def test_download_sharded(hub, monkeypatch):
    m = factrace.load("org/sharded")
    _same_logits(m, fixture_model("llama_sharded"))
    index = json.loads((FIXTURES / "llama_sharded" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert set(_weights_requested(hub)) == shards
    assert sorted(f for f in hub.downloaded() if f.endswith(".safetensors")) == sorted(shards)
    assert "model.safetensors" not in hub.fetched()
    _offline(monkeypatch, hub)
    _same_logits(factrace.load("org/sharded"), m)
    assert hub.requests == []


def test_gguf_file(hub, tmp_path, monkeypatch):
    local = tmp_path / "tiny-F32.gguf"
    local.write_bytes(hub.gguf["tiny-F32.gguf"])
    ref = factrace.load(local)
    m = factrace.load("org/gguf", gguf_file="tiny-F32.gguf")
    assert m.name == "org/gguf"
    ids = np.array([1, 5, 9, 14, 3, 7], dtype=np.int32)
    _same_logits(m, ref, ids)
    assert hub.fetched() == ["tiny-F32.gguf"]                 # only that file: no config, no other GGUF
    assert hub.downloaded() == ["tiny-F32.gguf"]
    _offline(monkeypatch, hub)
    _same_logits(factrace.load("org/gguf", gguf_file="tiny-F32.gguf"), ref, ids)
    assert hub.requests == []
    with pytest.raises(HubError, match="tiny-F16.gguf.*not in the cached snapshot"):
        factrace.load("org/gguf", gguf_file="tiny-F16.gguf")


def test_gguf_file_absent_lists_the_repo_ggufs(hub):
    with pytest.raises(HubError) as ei:
        factrace.load("org/gguf", gguf_file="tiny-Q4_K_M.gguf")
    msg = str(ei.value)
    assert "org/gguf" in msg and hub.url in msg and "tiny-Q4_K_M.gguf" in msg
    assert "tiny-F16.gguf" in msg and "tiny-F32.gguf" in msg
    assert hub.fetched() == []


def test_gguf_repo_without_gguf_file(hub):
    with pytest.raises(HubError, match=r"no config.json but GGUF files: pass gguf_file= .*tiny-F32.gguf"):
        factrace.load("org/gguf")
    assert hub.fetched() == []


def test_bad_gguf_file_names(hub):
    for bad in ("../x.gguf", "/abs.gguf", "a/../b.gguf", "model.safetensors"):
        with pytest.raises(HubError, match="gguf_file"):
            factrace.load("org/gguf", gguf_file=bad)
    assert hub.requests == []


def test_revision_pinning(hub, monkeypatch):
    m = factrace.load("org/tiny", revision="v0")
    assert m.config.arch == "LlamaForCausalLM"
    _same_logits(m, fixture_model("llama_gqa2_tied"))
    assert "/api/models/org/tiny/revision/v0" in [r.path for r in hub.requests]
    assert Path(m.source).name == hub.commits["tiny_v0"]
    assert (hub.cache / "models--org--tiny" / "refs" / "v0").read_text() == hub.commits["tiny_v0"]
    hub.clear()
    m = factrace.load("org/tiny", revision=hub.commits["tiny_v0"])
    assert m.config.arch == "LlamaForCausalLM"
    assert hub.requests == []    # a commit is immutable: its complete cached snapshot needs no request
    assert factrace.load("org/tiny").config.arch == "GPT2LMHeadModel"  # main
    _offline(monkeypatch, hub)
    assert factrace.load("org/tiny", revision="v0").config.arch == "LlamaForCausalLM"
    assert factrace.load("org/tiny", revision=hub.commits["tiny_v0"]).config.arch == "LlamaForCausalLM"
    assert factrace.load("org/tiny").config.arch == "GPT2LMHeadModel"
    with pytest.raises(HubError, match="offline.*revision 'v1' is not in the Hugging Face cache"):
        factrace.load("org/tiny", revision="v1")
    assert hub.requests == []


def test_commit_revision_downloads_when_not_cached(hub):
    m = factrace.load("org/tiny", revision=hub.commits["tiny_v0"])
    assert m.config.arch == "LlamaForCausalLM" and Path(m.source).name == hub.commits["tiny_v0"]
    assert not (hub.cache / "models--org--tiny" / "refs").exists() or \
        not any((hub.cache / "models--org--tiny" / "refs").iterdir())   # no branch name to record


def test_invalid_repo_id(hub):
    with pytest.raises(HubError, match="not a valid Hugging Face repo id"):
        factrace.load("org/a..b")
    assert hub.requests == []


def test_revision_not_found(hub):
    with pytest.raises(HubError) as ei:
        factrace.load("org/tiny", revision="no-such-branch")
    msg = str(ei.value)
    assert "revision 'no-such-branch' not found" in msg and "org/tiny" in msg and hub.url in msg
    assert "\n" not in msg
    assert hub.fetched() == []


# ---------------------------------------------------------------- access

def test_gated_without_token(hub):
    with pytest.raises(HubError) as ei:
        factrace.load("org/gated")
    msg = str(ei.value)
    assert isinstance(ei.value, CheckpointError)
    assert "org/gated" in msg and hub.url in msg and "gated" in msg and "no token was sent" in msg
    assert "accept the terms" in msg and f"{hub.url}/org/gated" in msg and "HF_TOKEN" in msg
    assert "\n" not in msg
    assert _weights_requested(hub) == []


def test_gated_with_a_token_without_access(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", BOB)
    with pytest.raises(HubError, match="gated repository and the token sent has no access.*accept the terms"):
        factrace.load("org/gated")
    assert _weights_requested(hub) == []


def test_gated_with_token(hub, monkeypatch):
    m = factrace.load("org/gated", token=ALICE)
    _same_logits(m, fixture_model("gpt2"))
    hub_requests = [r for r in hub.requests if r.server == "hub"]
    assert hub_requests and all(r.auth == f"Bearer {ALICE}" for r in hub_requests)
    assert all(r.auth is None for r in hub.requests if r.server == "cdn")   # the token stays on the Hub
    # HF_TOKEN read at call time
    monkeypatch.setenv("HF_HUB_CACHE", str(hub.cache.parent / "hub2"))
    monkeypatch.setenv("HF_TOKEN", ALICE)
    hub.clear()
    _same_logits(factrace.load("org/gated"), m)
    assert all(r.auth == f"Bearer {ALICE}" for r in hub.requests if r.server == "hub")


def test_invalid_token(hub):
    with pytest.raises(HubError, match="token was rejected"):
        factrace.load("org/tiny", token="hf_not_a_token")


def test_missing_repo(hub):
    with pytest.raises(HubError) as ei:
        factrace.load("org/does-not-exist")
    msg = str(ei.value)
    assert "'org/does-not-exist'" in msg and hub.url in msg and "repository not found" in msg
    assert "\n" not in msg
    assert hub.fetched() == []


def test_private_repo(hub):
    with pytest.raises(HubError, match="repository not found .*private.*no token was sent.*HF_TOKEN"):
        factrace.load("org/private")
    _same_logits(factrace.load("org/private", token=ALICE), fixture_model("gpt2"))


def test_no_network(hub, monkeypatch):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    t = time.monotonic()
    with pytest.raises(HubError) as ei:
        factrace.load("org/tiny")
    assert time.monotonic() - t < 5
    msg = str(ei.value)
    assert "cannot reach" in msg and endpoint in msg and "org/tiny" in msg and "HF_HUB_OFFLINE=1" in msg
    assert "\n" not in msg


def test_offline_and_not_cached(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError) as ei:
        factrace.load("org/tiny")
    msg = str(ei.value)
    assert "offline" in msg and "not in the Hugging Face cache" in msg and "org/tiny" in msg
    assert "HF_HUB_OFFLINE" in msg and "hf download org/tiny" in msg
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(HubError, match="offline"):
        factrace.load("org/tiny", local_files_only=True)
    assert hub.requests == []
    # local_files_only=False wins over HF_HUB_OFFLINE
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert factrace.load("org/tiny", local_files_only=False).config.arch == "GPT2LMHeadModel"


def test_hf_home_only(hub, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE")
    m = factrace.load("org/tiny")
    assert Path(m.source).is_relative_to(tmp_path / "hfhome" / "hub")


# ---------------------------------------------------------------- refusals before any weight

def test_unsupported_architecture(hub):
    with pytest.raises(ConfigError) as ei:
        factrace.load("org/bert")
    assert not isinstance(ei.value, HubError)
    assert "BertForMaskedLM" in str(ei.value) and "org/bert" in str(ei.value)
    assert hub.fetched() == ["config.json", "config.json"]     # HEAD + GET, nothing else
    assert _weights_requested(hub) == []


def test_bin_only_repo(hub):
    with pytest.raises(HubError, match="pytorch_model.bin.*safetensors only.*convert"):
        factrace.load("org/binonly")
    assert _weights_requested(hub) == []


def test_bad_shard_name_in_index(hub):
    with pytest.raises(HubError, match=r"bad shard name '\.\./evil\.safetensors'"):
        factrace.load("org/badindex")
    assert _weights_requested(hub) == []
    assert not any("evil" in r.path for r in hub.requests)


def test_index_lists_an_absent_shard(hub):
    with pytest.raises(HubError, match=f"lists '{hub.absent_shard}', which the repo does not have"):
        factrace.load("org/shortindex")
    assert _weights_requested(hub) == []


def test_file_missing_on_resolve(hub):
    with pytest.raises(HubError) as ei:
        factrace.load("org/liar")
    msg = str(ei.value)
    assert "file 'tokenizer.json' not found" in msg and "org/liar" in msg and hub.url in msg
    assert _weights_requested(hub) == []


# ---------------------------------------------------------------- wiring

def test_load_goes_through_resolve_hub(hub, monkeypatch):
    import factrace.io.hub

    calls = []
    real = factrace.io.hub.resolve_hub

    def spy(repo_id, **kw):
        calls.append((repo_id, kw))
        return real(repo_id, **kw)

    monkeypatch.setattr(factrace.io.hub, "resolve_hub", spy)
    factrace.load("org/tiny", revision="main")
    assert len(calls) == 1
    repo_id, kw = calls[0]
    assert repo_id == "org/tiny" and kw["revision"] == "main" and callable(kw["check_config"])
    assert hub.downloaded()  # it did download


def test_hub_options_need_a_repo_id(hub, tmp_path):
    with pytest.raises(ValueError, match="revision apply to repo ids only"):
        factrace.load(FIXTURES / "gpt2", revision="main")
    with pytest.raises(ValueError, match="gguf_file"):
        factrace.load("smollm2", gguf_file="x.gguf")
