"""Hugging Face Hub download for ``factrace.load("org/repo")``: a repo id becomes a local snapshot directory
(safetensors repos) or a local GGUF file, fetched with huggingface_hub into its standard cache.

Only what factrace reads is downloaded, in this order: ``config.json`` (checked for a supported architecture
before any weight is requested), the tokenizer files the repo has, then ``model.safetensors`` or
``model.safetensors.index.json`` and exactly the shards it lists. With ``gguf_file=`` only that file is
fetched. Offline (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``) the cache alone is used.

The environment is read at call time, not at import: ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, ``HF_TOKEN``,
``HF_HUB_CACHE`` / ``HF_HOME``, ``HF_HUB_ETAG_TIMEOUT``.

Every failure to get a repo is a :class:`HubError` (a :class:`factrace.CheckpointError`) with a one-line message
naming the repo id and the endpoint; an unsupported architecture is a :class:`factrace.ConfigError`.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import HubError

DEFAULT_ENDPOINT = "https://huggingface.co"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_TRUE = {"1", "on", "yes", "true"}


# ---------------------------------------------------------------- environment (read at call time)

def hub_endpoint() -> str:
    """``$HF_ENDPOINT`` without a trailing slash, else https://huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to 1/ON/YES/TRUE."""
    v = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return v.strip().lower() in _TRUE


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                                    "huggingface")
    return Path(home).expanduser() / "hub"


def _env_token():
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def _timeout() -> float:
    try:
        return float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or 10)
    except ValueError:
        return 10.0


# ---------------------------------------------------------------- the cache

def _repo_folder(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def cached_snapshot(repo_id: str, revision: str | None = None, cache: Path | None = None) -> Path:
    """The snapshot directory of ``repo_id`` at ``revision`` in the local cache, without any network access.

    ``revision`` (default ``"main"``) is looked up in ``refs/``, or taken as a commit hash. With no revision
    given and no ``refs/main``, the newest snapshot is used. Raises :class:`HubError` (saying it is offline and
    how to fetch) when the repo or revision is not cached.

    Example:
        >>> cached_snapshot("openai-community/gpt2")       # doctest: +SKIP
        PosixPath('/root/.cache/huggingface/hub/models--openai-community--gpt2/snapshots/607a30d...')
    """
    cache = hub_cache_dir() if cache is None else cache
    repo = _repo_folder(cache, repo_id)
    rev = revision or "main"
    fetch = (f"unset HF_HUB_OFFLINE (and local_files_only) to download it from {hub_endpoint()}, or fetch it first "
             f"with `hf download {repo_id}{'' if revision is None else ' --revision ' + revision}`")
    if not repo.is_dir():
        raise HubError(f"{repo_id!r}: offline (HF_HUB_OFFLINE or local_files_only) and not in the Hugging Face cache "
                       f"at {cache}: {fetch}")
    snap = None
    ref = repo / "refs" / rev
    if ref.is_file():
        commit = ref.read_text().strip()
        if _COMMIT.fullmatch(commit):
            snap = repo / "snapshots" / commit
    elif _COMMIT.fullmatch(rev):
        snap = repo / "snapshots" / rev
    elif revision is not None:
        raise HubError(f"{repo_id!r}: offline (HF_HUB_OFFLINE or local_files_only) and revision {revision!r} is not "
                       f"in the Hugging Face cache at {repo}: {fetch}")
    if snap is not None and not snap.is_dir():
        raise HubError(f"{repo_id!r}: offline (HF_HUB_OFFLINE or local_files_only) and revision {rev!r} points to "
                       f"snapshot {snap.name}, which is not in the cache at {repo}: {fetch}")
    if snap is None:
        snaps = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime) \
            if (repo / "snapshots").is_dir() else []
        if not snaps:
            raise HubError(f"{repo_id!r}: offline (HF_HUB_OFFLINE or local_files_only) and no snapshot in the "
                           f"Hugging Face cache at {repo}: {fetch}")
        snap = snaps[-1]
    return snap


def _write_ref(cache: Path, repo_id: str, revision: str, commit: str) -> None:
    """Record ``refs/<revision> -> commit`` like huggingface_hub does, so an offline load finds the snapshot."""
    if revision == commit:
        return
    ref = _repo_folder(cache, repo_id) / "refs" / revision
    try:
        if ref.is_file() and ref.read_text() == commit:
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
    except OSError:  # a read-only cache still works online
        pass


def _bad_name(fn) -> bool:
    """A shard or GGUF name that could leave the snapshot directory."""
    if not isinstance(fn, str) or not fn or "\\" in fn or fn.startswith("/") or "\x00" in fn:
        return True
    return any(part in ("", ".", "..") for part in fn.split("/"))


# ---------------------------------------------------------------- errors

def _describe(e: BaseException, repo_id: str, endpoint: str, revision: str | None, filename: str | None,
              token) -> HubError:
    """One-line HubError for a huggingface_hub / httpx error."""
    import httpx2
    from huggingface_hub import errors as hf

    rev = revision or "main"
    page = f"{endpoint}/{repo_id}"
    what = f"{repo_id!r} on {endpoint}"
    sent = "no token was sent" if not token else "the token sent has no access to it"
    cached = ""
    try:
        snap = cached_snapshot(repo_id, revision)
        cached = f" (the cache holds a snapshot of it: {snap})"
    except HubError:
        pass
    if isinstance(e, hf.GatedRepoError):
        return HubError(f"{what} is a gated repository and {sent}: accept the terms on the model page {page} "
                        f"(logged in), then set HF_TOKEN (or pass token=) to a token of that account")
    if isinstance(e, hf.RepositoryNotFoundError):
        return HubError(f"{what}: repository not found (if it is private, {sent}: set HF_TOKEN or pass token=)")
    if isinstance(e, hf.RevisionNotFoundError):
        return HubError(f"{what}: revision {rev!r} not found (a branch, tag or commit hash of the repo)")
    if isinstance(e, (hf.RemoteEntryNotFoundError, hf.EntryNotFoundError)) and \
            not isinstance(e, hf.LocalEntryNotFoundError):
        return HubError(f"{what}: file {filename!r} not found at revision {rev!r}")
    if isinstance(e, hf.OfflineModeIsEnabled):
        return HubError(f"{what}: huggingface_hub is in offline mode (HF_HUB_OFFLINE was set when it was imported); "
                        f"unset HF_HUB_OFFLINE before starting Python to download")
    if isinstance(e, hf.DisabledRepoError):
        return HubError(f"{what}: access to this repository is disabled")
    if isinstance(e, hf.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            return HubError(f"{what}: the token was rejected (invalid credentials): check HF_TOKEN or token=")
        return HubError(f"{what}: HTTP {status} for {filename or 'the repo info'} "
                        f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})")
    if isinstance(e, hf.FileMetadataError):
        return HubError(f"{what}: the endpoint did not answer like a Hugging Face Hub for {filename!r} (check "
                        f"HF_ENDPOINT and proxies); set HF_HUB_OFFLINE=1 to use only the cache{cached}")
    if isinstance(e, (httpx2.TransportError, hf.LocalEntryNotFoundError, ConnectionError, TimeoutError)):
        return HubError(f"{what}: cannot reach the endpoint ({type(e).__name__}); check the network or HF_ENDPOINT, "
                        f"or set HF_HUB_OFFLINE=1 to use only the cache{cached}")
    return HubError(f"{what}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")


def _hub_call(fn, repo_id, endpoint, revision, filename, token):
    import httpx2
    from huggingface_hub import errors as hf

    try:
        return fn()
    except hf.HFValidationError as e:
        raise HubError(f"{repo_id!r}: not a valid Hugging Face repo id or file name "
                       f"({str(e).strip().splitlines()[0] if str(e).strip() else 'rejected by huggingface_hub'})") from e
    except (hf.HfHubHTTPError, hf.EntryNotFoundError, hf.OfflineModeIsEnabled, hf.FileMetadataError,
            httpx2.TransportError, ConnectionError, TimeoutError) as e:
        raise _describe(e, repo_id, endpoint, revision, filename, token) from e


# ---------------------------------------------------------------- resolve

def resolve_hub(repo_id: str, *, revision: str | None = None, local_files_only: bool | None = None,
                gguf_file: str | None = None, token: str | bool | None = None, check_config=None) -> Path:
    """Download (or find in the cache) what factrace needs of a Hugging Face model repo; return its local path.

    Args:
        repo_id: ``"org/name"``.
        revision: branch, tag or commit hash; default ``"main"``. Every file comes from the one commit the
            revision pointed to when resolved.
        local_files_only: use only the cache, never the network. Default None: True when ``HF_HUB_OFFLINE`` is
            set, else False.
        gguf_file: the name of one ``.gguf`` file in the repo: only that file is downloaded and its local path
            returned (no config.json is needed).
        token: a Hub token (or False for none); default ``$HF_TOKEN``, else huggingface_hub's saved login.
        check_config: ``check_config(config_dict, where)``, called on config.json before any weight is
            requested; it should raise (factrace's ConfigError) for an unsupported model.

    Returns:
        The snapshot directory (config.json, tokenizer files, safetensors) or, with ``gguf_file``, the GGUF
        file's path, both inside the standard cache ($HF_HUB_CACHE, else $HF_HOME/hub).

    Raises:
        HubError: repository not found (or private without a token), gated without a valid token, endpoint
            unreachable (set HF_HUB_OFFLINE=1 to use only the cache), revision or file not found, a bad shard
            name in the index, only pytorch_model.bin weights, offline and not cached.
        ConfigError: from ``check_config`` (no weight file has been requested then), or an unreadable config.

    Example:
        >>> from factrace.io.hub import resolve_hub
        >>> resolve_hub("HuggingFaceTB/SmolLM2-135M")                                # doctest: +SKIP
        PosixPath('/root/.cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-135M/snapshots/93efa2f...')
        >>> resolve_hub("bartowski/SmolLM2-135M-Instruct-GGUF",
        ...             gguf_file="SmolLM2-135M-Instruct-Q8_0.gguf")                   # doctest: +SKIP
    """
    if not isinstance(repo_id, str) or not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise HubError(f"{repo_id!r}: not a Hugging Face repo id (expected 'org/name')")
    if gguf_file is not None and (_bad_name(gguf_file) or not gguf_file.endswith(".gguf")):
        raise HubError(f"{repo_id!r}: gguf_file={gguf_file!r} is not the name of a .gguf file in the repo")
    offline = hub_offline() if local_files_only is None else bool(local_files_only)
    cache = hub_cache_dir()
    if offline:
        return _resolve_cached(repo_id, revision, gguf_file, cache, check_config)
    if revision is not None and _COMMIT.fullmatch(revision):
        # a commit never changes: a complete cached snapshot of it is used without any request
        try:
            return _resolve_cached(repo_id, revision, gguf_file, cache, check_config, complete=True)
        except HubError:
            pass
    if token is None:
        from huggingface_hub import get_token

        token = _env_token() or get_token()  # get_token: huggingface_hub's saved login
    return _resolve_online(repo_id, revision, gguf_file, cache, check_config, token)


def _read_config(path: Path, where: str, check_config) -> None:
    from ..errors import ConfigError

    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{where}: unreadable ({e})") from None
    if check_config is not None:
        check_config(raw, where)


def _resolve_cached(repo_id, revision, gguf_file, cache, check_config, complete=False) -> Path:
    """The cached snapshot (or GGUF file); ``complete``: also require config.json and every weight file."""
    snap = cached_snapshot(repo_id, revision, cache)
    off = "offline (HF_HUB_OFFLINE or local_files_only)"
    fetch = f"unset HF_HUB_OFFLINE (and local_files_only) to download it from {hub_endpoint()}"
    if gguf_file is not None:
        p = snap / gguf_file
        if not p.is_file():
            have = sorted(q.relative_to(snap).as_posix() for q in snap.rglob("*.gguf"))
            raise HubError(f"{repo_id!r}: {off} and {gguf_file!r} is not in the cached snapshot {snap} "
                           f"(cached .gguf files: {', '.join(have) or 'none'}): {fetch}")
        return p
    cpath = snap / "config.json"
    index = snap / "model.safetensors.index.json"
    if complete and not (cpath.is_file() and (index.is_file() or (snap / "model.safetensors").is_file())):
        raise HubError(f"{repo_id!r}: the cached snapshot {snap} is incomplete")
    if cpath.is_file():
        _read_config(cpath, str(cpath), check_config)
    if index.is_file():
        try:
            wm = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            shards = sorted({v for v in wm.values() if isinstance(v, str)})
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            if complete:
                raise HubError(f"{repo_id!r}: the cached index {index} is unreadable") from None
            shards = []  # the loader reports the bad index
        missing = [s for s in shards if not _bad_name(s) and not (snap / s).exists()]
        if missing:
            raise HubError(f"{repo_id!r}: {off} and the cached snapshot {snap} is incomplete (missing "
                           f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}): {fetch} to finish it")
    return snap


def _resolve_online(repo_id, revision, gguf_file, cache, check_config, token) -> Path:
    from huggingface_hub import HfApi, hf_hub_download

    endpoint = hub_endpoint()
    timeout = _timeout()
    rev = revision or "main"
    api = HfApi(endpoint=endpoint, token=token)
    info = _hub_call(lambda: api.model_info(repo_id, revision=revision, timeout=timeout, token=token),
                     repo_id, endpoint, revision, None, token)
    commit = info.sha
    if not isinstance(commit, str) or not _COMMIT.fullmatch(commit):
        raise HubError(f"{repo_id!r} on {endpoint}: the repo info has no commit hash for revision {rev!r}")
    files = {s.rfilename for s in (info.siblings or [])}
    ggufs = sorted(f for f in files if f.endswith(".gguf"))

    def get(filename: str) -> Path:
        return Path(_hub_call(lambda: hf_hub_download(
            repo_id, filename, revision=commit, cache_dir=cache, endpoint=endpoint, token=token,
            local_files_only=False, etag_timeout=timeout), repo_id, endpoint, revision, filename, token))

    where = f"{repo_id!r} on {endpoint} (revision {rev!r})"
    if gguf_file is not None:
        if gguf_file not in files:
            raise HubError(f"{where}: no file {gguf_file!r}; the repo's .gguf files: {', '.join(ggufs) or 'none'}")
        path = get(gguf_file)
        _write_ref(cache, repo_id, rev, commit)
        return path
    if "config.json" not in files:
        if ggufs:
            raise HubError(f"{where}: no config.json but GGUF files: pass gguf_file= one of {', '.join(ggufs[:8])}"
                           f"{' ...' if len(ggufs) > 8 else ''}")
        raise HubError(f"{where}: no config.json (not a transformers model repo)")
    cpath = get("config.json")
    _write_ref(cache, repo_id, rev, commit)
    _read_config(cpath, f"{endpoint}/{repo_id}/blob/{commit}/config.json", check_config)
    snap = cpath.parent
    for fn in TOKENIZER_FILES:
        if fn in files:
            get(fn)
    if "model.safetensors.index.json" in files:
        index = get("model.safetensors.index.json")
        try:
            wm = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
            raise HubError(f"{where}: model.safetensors.index.json is unreadable ({e})") from None
        if not isinstance(wm, dict) or not wm:
            raise HubError(f"{where}: model.safetensors.index.json has no weight_map object")
        shards = sorted(set(wm.values()), key=str)
        for s in shards:
            if _bad_name(s) or "/" in s or not s.endswith(".safetensors"):
                raise HubError(f"{where}: model.safetensors.index.json lists a bad shard name {str(s)[:100]!r}")
            if s not in files:
                raise HubError(f"{where}: model.safetensors.index.json lists {s!r}, which the repo does not have")
        for s in shards:
            get(s)
    elif "model.safetensors" in files:
        get("model.safetensors")
    else:
        other = sorted(f for f in files if f.endswith(".safetensors") and "/" not in f)
        if other:  # like the loader: any top-level *.safetensors
            for s in other:
                get(s)
        elif any(f.endswith((".bin", ".bin.index.json")) for f in files):
            raise HubError(f"{where}: only PyTorch pytorch_model.bin weights; factrace reads safetensors only: "
                           f"convert them (e.g. transformers from_pretrained(...).save_pretrained(dir) writes "
                           f"safetensors) and load the directory, or use a revision with model.safetensors")
        else:
            raise HubError(f"{where}: no model.safetensors or model.safetensors.index.json weights")
    return snap
