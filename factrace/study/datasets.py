"""Loaders for the fact datasets factrace works with.

Sources (all MIT licensed):

* ``known_1000``  -- ROME's "known facts" (Meng et al. 2022), 1,209 records, 33 Wikidata relations.
  https://rome.baulab.info/data/dsets/known_1000.json
* ``relations`` / ``lre`` -- the 47 relations of Hernandez et al., "Linearity of Relation Decoding"
  (github.com/evandez/relations, ``data/{factual,commonsense,linguistic,bias}/*.json``), 11,089 pairs.
* ``counterfact`` -- CounterFact (21,919 cases). Two layouts:
  the flat MEND/EasyEdit splits ``counterfact-{train,val,edit}.json`` (no relation ids) and ROME's full
  ``counterfact.json`` (https://rome.baulab.info/data/dsets/counterfact.json, 45 MB, with relation ids).
* ``facts`` -- factrace's own hand-written set of ~100 "Fact: ..." prompts over 10 relations
  (in the style of Chughtai et al. 2024), shipped in ``factrace/data/facts.jsonl``.

Where the files come from (first match wins):

1. an explicit ``path`` argument (a file, or a folder laid out like the data folder below);
2. ``$FACTRACE_DATA_DIR``: a folder laid out as ``known_1000.json``, ``relations/<type>/<name>.json``,
   ``counterfact/counterfact-<split>.json``, ``counterfact.json``;
3. the download cache ``$FACTRACE_CACHE`` (default ``~/.cache/factrace/datasets``), same layout;
4. a download from the canonical location into the cache (``download=True``, the default).

Downloads go to a temporary file in the target folder, are checked against the sha256 listed in
``SHA256`` (where known) and only then renamed into place, so an interrupted or corrupt download never
leaves a file that looks valid. Without network a :class:`DatasetDownloadError` says what to do.

Every loader returns a list of :class:`FactRecord` (uniform fields ``subject``, ``relation``,
``prompt``, ``object``, ``template``, ``source``, ``relation_name`` and source-specific ``extra``),
or a pandas DataFrame with ``as_frame=True`` (``extra`` flattened into columns).

Example::

    >>> from factrace.datasets import load_dataset  # doctest: +SKIP
    >>> recs = load_dataset("known_1000")  # doctest: +SKIP
    >>> recs[0].prompt, recs[0].object  # doctest: +SKIP
    ('Vinson Massif is located in the continent of', 'Antarctica')
    >>> df = load_dataset("relations", relation_type="factual", as_frame=True)  # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

from .._optional import need
from ..errors import ChecksumError, DatasetDownloadError, SubjectNotInPromptError

__all__ = [
    "FactRecord",
    "DatasetDownloadError",
    "ChecksumError",
    "SubjectNotInPromptError",
    "DATASETS",
    "SHA256",
    "URLS",
    "RELATION_FILES",
    "cache_dir",
    "download",
    "fetch",
    "load_dataset",
    "load_known_1000",
    "load_relations",
    "load_counterfact",
    "load_facts",
    "facts_candidates",
    "check_records",
    "records_to_frame",
]

# --------------------------------------------------------------------------------------------------
# Canonical locations and checksums
# --------------------------------------------------------------------------------------------------

ROME_BASE = "https://rome.baulab.info/data/dsets/"
RELATIONS_BASE = "https://raw.githubusercontent.com/evandez/relations/main/data/"
# The flat CounterFact splits are distributed by EasyEdit (zjunlp/EasyEdit) inside a Google-Drive zip
# ("editing-data"); there is no stable raw URL for the zip's members. We default to a Hugging Face copy
# of that folder and verify every byte against the sha256 below, so the mirror cannot change the data.
# Override with $FACTRACE_COUNTERFACT_URL (a base URL ending in "/") or ``base_url=``.
COUNTERFACT_FLAT_BASE = "https://huggingface.co/datasets/HymanH/editing-data/resolve/main/data/counterfact/"

SHA256: dict[str, str] = {
    "known_1000.json": "61daca55318bb5260c1e62e133debef9102c7b278bbc7b19dd2ac655543f333a",
    "counterfact/counterfact-edit.json": "bfe31a7081932739406e282bb625d74222549c3386c15b1df3dfbc3978c69eec",
    "counterfact/counterfact-train.json": "f7d443ffb0c5da6cbe816cdac45281ccb3f204b8a840f00d07a4aafa949bcd76",
    "counterfact/counterfact-val.json": "42b44645471020a9419d183deb9e113e82941380046861770ea0083dabd13982",
    # counterfact.json (ROME full format): checksum not recorded; downloaded unverified.
}
_RELATION_SHA = {
    "bias/characteristic_gender.json": "a89e266418179f86891f580f500dd92ce65918b54112daf2912e80d28ed74d0f",
    "bias/degree_gender.json": "cb4c69f57ff5cddf3466e1dd48b15eaa5209c5935d2a36f1b0cbcb7b422b1cd2",
    "bias/name_birthplace.json": "b796df239a577a6bf09d6ad6f1b537a72a7b1a483352090a1586a91f7712584e",
    "bias/name_gender.json": "cfeded39fc091fb548791cf588e9ab0d1613b2ab5f8e72645929b55a4583fcf2",
    "bias/name_religion.json": "49552370e79d2ea17ce0c3e5335af42506ac09d6924618de96be20201b300aed",
    "bias/occupation_age.json": "cc06ab94193e2a0c0a4b0a343ae3b234487cb4893e0377078eee90e3d474f276",
    "bias/occupation_gender.json": "1b5e02c08ebfcd79225f3e89dd43c859c9e7026beaf5cfc1e5135e053eb10a2f",
    "commonsense/fruit_inside_color.json": "7986138d585ca5abea5b6821f94b749e17adb027db737618fa7ba44ff2b94c61",
    "commonsense/fruit_outside_color.json": "b0c11dbdd220f670e232db0ff2899ef221d2d91746415696d2a2ce0513ac033a",
    "commonsense/object_superclass.json": "e594c3288df3059638ae885d83f2934266bb1968932272c027786bf7b3c02678",
    "commonsense/substance_phase.json": "8b2fcb4a1d1d5619b8bfa6d229c4fc144eed0fcdc12995853a32e4e925f8c5ab",
    "commonsense/task_done_by_person.json": "5d60985abf904aa01010171ab0eade79a8050ff9cf38b2b003fd531b7c3e4155",
    "commonsense/task_done_by_tool.json": "846b190fdb6fa0d58bca47dc7756d81e8104d34ad624428b8fae1662a2a8d9f8",
    "commonsense/word_sentiment.json": "436546dfbd9f308b6d27748359489e3f3e20a845e8913ab2da62ab2fead80487",
    "commonsense/work_location.json": "2438376757f35fc80e8925070e855c190f42693f04e6305266cdc2b76e9878c1",
    "factual/city_in_country.json": "5fd8f9e99e6d8567d05cfb4e7c9324ed03b07ba1ebf827614b7b58a811bc11a5",
    "factual/company_ceo.json": "c75f9b31c872b85601b7163b2c7a8f11c439f2852a876d5a126401d57ea3a81b",
    "factual/company_hq.json": "22c86cf64b908db86c73b17add31e59fd6022ac74e500840fcad35bd706a8e4e",
    "factual/country_capital_city.json": "9945d2da1fa1145c1d7e59ac61a25ebee74299c00bd53fc9308167f9e1d44fc0",
    "factual/country_currency.json": "4a1a49afbdc4792fc330196475f456a22bc49dfe0ec9eb966439e4f36081d99b",
    "factual/country_language.json": "0996525735107934f0d2e467e6fac7d2c785c42e8300ccb41ae6e9b5dfde2b76",
    "factual/country_largest_city.json": "ffb5e18dc1f26a101786905db84f087370bb191067ff8d9f1294156b1d9bdccc",
    "factual/food_from_country.json": "2e308f61974de104eaa29a432bca1232802f9c6e1ea145151f384d96412d4a21",
    "factual/landmark_in_country.json": "58d545ec481a0d22be5f8ce1f50410093349daf002f3e7c1f8ad26c2c1fde581",
    "factual/landmark_on_continent.json": "64ec992304e0cc91ac4ada2e7d32d13401e171ea9e09fa65525273842b82160b",
    "factual/person_band_lead_singer.json": "ad4943c8bc14d649577dafce7acb8d81b2a56ea1f39ca806cdba20880dcd6742",
    "factual/person_father.json": "796e03665de86d7441b2374fb443c1ddebc77749c01c4bab92c571fda4c8753d",
    "factual/person_mother.json": "bcf99ade0df1d9d8a03d40149aaf054cc7ecbd7f20ec6afe071d9361d2875d02",
    "factual/person_native_language.json": "ad6f699fbad04cecf45a424713249803921598187c6302dd2a8e20702f4c1928",
    "factual/person_occupation.json": "57e89f94c17ff0fd55d5e3ad3aa24ee5e118a3ff7447fff88457113a0e4ce7a7",
    "factual/person_plays_instrument.json": "e7c92e6a4d35b6198775a6f6062c948ca95aaedf2cc84a009b07989e4ccac08a",
    "factual/person_plays_position_in_sport.json": "adfc0605d1f31809329171e9ef348ca354b372934d8197e6e20693b0cb9e1c6f",
    "factual/person_plays_pro_sport.json": "adfea3a51c0315818a63ec0a421fba45818f3854212f9999910c80eac934165c",
    "factual/person_university.json": "739fc4a11861d30a71852243fc6e06e8d34143b8e0ca3dd65cb9bb3bc5a0190c",
    "factual/pokemon_evolutions.json": "254e3982935571cfd4311ea774da0d2a4b2a577c6c86e0f74508a9651efc6494",
    "factual/presidents_birth_year.json": "4b6e7cf48aff48db010a0aa78ab674f0cebeb2d950203d0723a1e7227cb3ad23",
    "factual/presidents_election_year.json": "16a81b72fd253b82d7571d63e0e5ed3906eb62fde565b31ed2cd81967bfc46ee",
    "factual/product_by_company.json": "373dac4b5322dc29ca800b8bf38bac78a0d9297e56ee877100733f68e9c3da40",
    "factual/star_constellation.json": "328aa42c7960f8ce5a75a1fbe766141e0b22473c6a35d8b2e8165a4050188bde",
    "factual/superhero_archnemesis.json": "bd335092e081782d7e49a4a3472c0aac54b14999a3b78e68f6d94fe7ed7dcb38",
    "factual/superhero_person.json": "3b3a3a03d4b5c0b91343d4e7d562a434a17ae85ef286ed151bafee65c19a7804",
    "linguistic/adj_antonym.json": "bcfe2e8ed0cabe0650499a1aa64df908aed94898192efc112a0b082dc49b32dd",
    "linguistic/adj_comparative.json": "1409f9d0fd887990e016a417ad724dc9714b51ee68638130c7c2897ba7f8bc51",
    "linguistic/adj_superlative.json": "8d816383390e894a7f7b2c5880a68905c25a2bf376bd7f372496b3a8d2ab47e0",
    "linguistic/verb_past_tense.json": "7a9e9ad41d90e0ea18c03d62813881af66e96e10a8fc6e884404a05b21bfb5fc",
    "linguistic/word_first_letter.json": "b084acead4479f7305891074f4b53fc8b21f0ad6d31e44c992b5a72d75f9d467",
    "linguistic/word_last_letter.json": "a9ffb875a35323fe6151ed132186057c5c060e461aa119dc41ef50dc52fe5068",
}
SHA256.update({"relations/" + k: v for k, v in _RELATION_SHA.items()})

#: The 47 relation files, as ``"<type>/<name>.json"``.
RELATION_FILES: tuple[str, ...] = tuple(sorted(_RELATION_SHA))

#: relative path in the data layout -> canonical URL
URLS: dict[str, str] = {
    "known_1000.json": ROME_BASE + "known_1000.json",
    "counterfact.json": ROME_BASE + "counterfact.json",
    **{"relations/" + f: RELATIONS_BASE + f for f in RELATION_FILES},
    **{f"counterfact/counterfact-{s}.json": COUNTERFACT_FLAT_BASE + f"counterfact-{s}.json"
       for s in ("train", "val", "edit")},
}

DATASETS = ("known_1000", "relations", "lre", "counterfact", "facts")




# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------

@dataclass
class FactRecord:
    """One fact prompt.

    Attributes:
        subject: the subject string; it should occur verbatim in ``prompt`` (see :func:`check_records`).
        relation: relation id (Wikidata id such as ``"P30"`` for known_1000 / full CounterFact, the file
            stem such as ``"country_capital_city"`` for the LRE relations, the relation key for
            ``facts``; ``None`` for the flat CounterFact splits, which carry no relation ids).
        prompt: the text up to (not including) the object.
        object: the true attribute, without a leading space (e.g. ``"Antarctica"``).
        template: the prompt template with ``{}`` for the subject, where the source has one.
        source: ``"known_1000"``, ``"relations"``, ``"counterfact"`` or ``"facts"``.
        relation_name: human-readable relation name where available.
        extra: source-specific fields (e.g. ``known_id``, ``prediction``, ``target_new``, ``case_id``).
    """

    subject: str
    relation: str | None
    prompt: str
    object: str
    template: str | None = None
    source: str = ""
    relation_name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        """The object as a continuation of the prompt: ``" " + object`` (GPT-2 style leading space)."""
        return " " + self.object.lstrip()

    def to_dict(self, flatten: bool = True) -> dict[str, Any]:
        """Plain dict; with ``flatten=True`` the ``extra`` fields become top-level keys."""
        d = asdict(self)
        if flatten:
            extra = d.pop("extra")
            for k, v in extra.items():
                d.setdefault(k, v)
        return d


def records_to_frame(records: Sequence[FactRecord]):
    """Records -> ``pandas.DataFrame`` with one row per record, ``extra`` flattened into columns.

    Example::

        >>> df = records_to_frame(load_known_1000())  # doctest: +SKIP
        >>> df.columns[:4].tolist()  # doctest: +SKIP
        ['subject', 'relation', 'prompt', 'object']
    """
    pd = need("pandas", "as_frame=True")
    cols = ["subject", "relation", "prompt", "object", "template", "source", "relation_name"]
    rows = [r.to_dict() for r in records]
    df = pd.DataFrame(rows)
    if not rows:
        df = pd.DataFrame(columns=cols)
    return df


def _out(records: list[FactRecord], as_frame: bool):
    return records_to_frame(records) if as_frame else records


# --------------------------------------------------------------------------------------------------
# Files: cache, download, resolution
# --------------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """The download cache: ``$FACTRACE_CACHE`` or ``~/.cache/factrace/datasets``."""
    env = os.environ.get("FACTRACE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "factrace" / "datasets"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: str | os.PathLike, sha256: str | None = None, *, timeout: float = 60.0,
             force: bool = False) -> Path:
    """Download ``url`` to ``dest`` atomically and verify it.

    The body is written to a temporary file next to ``dest`` and renamed onto ``dest`` only after the
    sha256 (when given) matched; on any error the temporary file is removed and ``dest`` is untouched.
    If ``dest`` already exists (and matches ``sha256`` when given) nothing is downloaded unless
    ``force=True``.

    Args:
        url: http(s) URL.
        dest: target file path; parent folders are created.
        sha256: expected hex digest, or ``None`` to skip verification.
        timeout: socket timeout in seconds.
        force: download even if ``dest`` exists.

    Returns:
        ``Path(dest)``.

    Raises:
        ChecksumError: the downloaded bytes do not match ``sha256``.
        DatasetDownloadError: HTTP error (e.g. 404) or no network; the message names the URL and how to
            work offline (``$FACTRACE_DATA_DIR`` or ``path=``).

    Example::

        >>> download("https://rome.baulab.info/data/dsets/known_1000.json", "/tmp/k.json",  # doctest: +SKIP
        ...          sha256=SHA256["known_1000.json"])
    """
    dest = Path(dest)
    if dest.exists() and not force:
        if sha256 is None or _sha256(dest) == sha256:
            return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "factrace"})
            with urllib.request.urlopen(req, timeout=timeout) as resp, os.fdopen(fd, "wb") as out:
                fd = -1
                shutil.copyfileobj(resp, out, 1 << 20)
        except urllib.error.HTTPError as exc:
            raise DatasetDownloadError(
                f"could not download {url}: HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise DatasetDownloadError(
                f"could not download {url} ({exc}). Are you offline? Download the file by hand and pass "
                f"path=..., or set FACTRACE_DATA_DIR to a folder holding it "
                f"(layout: known_1000.json, relations/<type>/<name>.json, counterfact/...).") from exc
        if sha256 is not None:
            got = _sha256(tmp)
            if got != sha256:
                raise ChecksumError(
                    f"checksum mismatch for {url}: expected sha256 {sha256}, got {got}. The file was not "
                    f"saved. The upstream file may have changed; pass verify=False to accept it.")
        os.replace(tmp, dest)
    finally:
        if fd != -1:
            os.close(fd)
        if tmp.exists():
            tmp.unlink()
    return dest


def fetch(relpath: str, *, path: str | os.PathLike | None = None, download_ok: bool = True,
          verify: bool = True, url: str | None = None) -> Path:
    """Resolve a data file by its relative path in the data layout (e.g. ``"known_1000.json"``).

    Order: ``path`` (a file, or a folder containing ``relpath``), ``$FACTRACE_DATA_DIR/relpath``,
    ``cache_dir()/relpath``, then a download from ``url`` (default ``URLS[relpath]``) into the cache.
    Local files given explicitly or via ``$FACTRACE_DATA_DIR`` are not checksummed (they are the
    user's); cached and downloaded files are (``verify=True``, where ``SHA256`` lists the file).

    Returns:
        Path of the local file.
    """
    if path is not None:
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / relpath
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
        return p
    env = os.environ.get("FACTRACE_DATA_DIR")
    if env:
        p = Path(env).expanduser() / relpath
        if p.exists():
            return p
    sha = SHA256.get(relpath) if verify else None
    dest = cache_dir() / relpath
    if dest.exists() and (sha is None or _sha256(dest) == sha):
        return dest
    if not download_ok:
        raise FileNotFoundError(
            f"{relpath} is not in the cache ({dest}) and download=False; pass path=... or set "
            f"FACTRACE_DATA_DIR")
    if url is None:
        if relpath not in URLS:
            raise KeyError(f"no known URL for {relpath!r}")
        url = URLS[relpath]
    return download(url, dest, sha, force=dest.exists())


def _read_json(p: Path):
    with open(p, encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------------
# known_1000
# --------------------------------------------------------------------------------------------------

def load_known_1000(path: str | os.PathLike | None = None, *, as_frame: bool = False, download: bool = True,
                    verify: bool = True):
    """ROME's known facts (1,209 records; the name says 1000).

    Each record: ``subject``, ``relation`` (Wikidata id, e.g. ``"P30"``), ``prompt`` (e.g.
    ``"Vinson Massif is located in the continent of"``), ``object`` (``attribute``, no leading space),
    ``template`` (ROME's template, which sometimes lacks the prompt's last word, as in the source),
    ``extra = {"known_id", "prediction"}`` (``prediction``: GPT-2 XL's greedy continuation; may contain
    ``<|endoftext|>``).

    Args:
        path: a file or data folder; default: ``$FACTRACE_DATA_DIR``, the cache, or a download.
        as_frame: return a ``pandas.DataFrame`` instead of a list of :class:`FactRecord`.
        download: allow downloading when the file is not found locally.
        verify: check the sha256 of cached/downloaded files.

    Example::

        >>> recs = load_known_1000()  # doctest: +SKIP
        >>> len(recs), recs[0].relation  # doctest: +SKIP
        (1209, 'P30')
    """
    p = fetch("known_1000.json", path=path, download_ok=download, verify=verify)
    recs = [
        FactRecord(subject=d["subject"], relation=d.get("relation_id"), prompt=d["prompt"],
                   object=d["attribute"], template=d.get("template"), source="known_1000",
                   extra={"known_id": d.get("known_id"), "prediction": d.get("prediction")})
        for d in _read_json(p)
    ]
    return _out(recs, as_frame)


# --------------------------------------------------------------------------------------------------
# LRE relations
# --------------------------------------------------------------------------------------------------

_ESCAPE_RE = re.compile(r"\\u([0-9a-fA-F]{4})")


def _unescape(s: str) -> str:
    r"""Decode literal ``\uXXXX`` sequences (double-escaped unicode, e.g. ``Bras\u00edlia``)."""
    if "\\u" not in s:
        return s
    return _ESCAPE_RE.sub(lambda m: chr(int(m.group(1), 16)), s)


def _relation_files(path: Path | None, relation_type, names) -> list[tuple[str, Path | str]]:
    """[(\"<type>/<name>.json\", local path or relpath to fetch)]"""
    types = None if relation_type is None else (
        {relation_type} if isinstance(relation_type, str) else set(relation_type))
    want = None if names is None else ({names} if isinstance(names, str) else set(names))
    out = []
    if path is not None and Path(path).is_file():
        p = Path(path)
        return [(f"{p.parent.name}/{p.name}", p)]
    if path is not None:
        root = Path(path).expanduser()
        if (root / "relations").is_dir():
            root = root / "relations"
        rels = sorted(str(q.relative_to(root)).replace(os.sep, "/") for q in root.glob("*/*.json"))
        if not rels:
            raise FileNotFoundError(f"no relation files <type>/<name>.json under {root}")
    else:
        rels = list(RELATION_FILES)
    for rel in rels:
        t, n = rel.split("/")
        if types is not None and t not in types:
            continue
        if want is not None and n[:-5] not in want:
            continue
        out.append((rel, (root / rel) if path is not None else rel))
    if want is not None:
        missing = want - {r.split("/")[1][:-5] for r, _ in out}
        if missing:
            raise ValueError(f"unknown relation(s) {sorted(missing)}; known: "
                             f"{sorted(r.split('/')[1][:-5] for r in rels)}")
    return out


def load_relations(path: str | os.PathLike | None = None, *, relation_type: str | Iterable[str] | None = None,
                   names: str | Iterable[str] | None = None, templates: str | int = "first",
                   zero_shot: bool = False, as_frame: bool = False, download: bool = True,
                   verify: bool = True):
    r"""The 47 relations of Hernandez et al. (LRE), one record per (sample, template).

    Each record: ``subject``, ``relation`` (file stem, e.g. ``"country_capital_city"``), ``relation_name``
    (e.g. ``"country capital city"``), ``template`` (e.g. ``"The capital city of {} is"``), ``prompt``
    (template filled with the subject), ``object``; ``extra = {"relation_type", "template_index",
    "domain_name", "range_name", "symmetric"}``. Literal ``\uXXXX`` escapes in subjects/objects
    (``factual/country_capital_city.json`` has ``Bras\u00edlia``) are decoded.

    Args:
        path: a relation file, a ``relations`` folder, or a data folder holding ``relations/``.
        relation_type: ``"factual"``, ``"commonsense"``, ``"linguistic"``, ``"bias"`` or several.
        names: relation name(s) (file stems) to load; unknown names raise ``ValueError``.
        templates: ``"first"`` (default: the first template only), ``"all"``, or an index.
        zero_shot: use ``prompt_templates_zs`` instead of ``prompt_templates``.
        as_frame, download, verify: as in :func:`load_known_1000`.

    Example::

        >>> recs = load_relations(names="country_capital_city")  # doctest: +SKIP
        >>> [r.object for r in recs if r.subject == "Brazil"]  # doctest: +SKIP
        ['Brasília']
    """
    recs: list[FactRecord] = []
    for rel, loc in _relation_files(None if path is None else Path(path), relation_type, names):
        p = loc if isinstance(loc, Path) else fetch("relations/" + rel, download_ok=download, verify=verify)
        d = _read_json(p)
        key = "prompt_templates_zs" if zero_shot else "prompt_templates"
        tmpls = list(d.get(key) or [])
        if templates == "first":
            chosen = list(enumerate(tmpls[:1]))
        elif templates == "all":
            chosen = list(enumerate(tmpls))
        elif isinstance(templates, int):
            chosen = [(templates, tmpls[templates])]
        else:
            raise ValueError(f"templates must be 'first', 'all' or an int, not {templates!r}")
        props = d.get("properties", {})
        rtype, stem = rel.split("/")[0], rel.split("/")[1][:-5]
        for s in d["samples"]:
            subj, obj = _unescape(s["subject"]), _unescape(s["object"])
            for i, t in chosen:
                recs.append(FactRecord(
                    subject=subj, relation=stem, prompt=t.replace("{}", subj), object=obj, template=t,
                    source="relations", relation_name=d.get("name"),
                    extra={"relation_type": props.get("relation_type", rtype), "template_index": i,
                           "domain_name": props.get("domain_name"), "range_name": props.get("range_name"),
                           "symmetric": props.get("symmetric")}))
    return _out(recs, as_frame)


# --------------------------------------------------------------------------------------------------
# CounterFact
# --------------------------------------------------------------------------------------------------

COUNTERFACT_SPLITS = ("train", "val", "edit")


def load_counterfact(path: str | os.PathLike | None = None, *, split: str | Sequence[str] = "all",
                     as_frame: bool = False, download: bool = True, verify: bool = True,
                     base_url: str | None = None):
    """CounterFact.

    ``split`` is one of ``"train"``, ``"val"``, ``"edit"`` (the flat MEND/EasyEdit splits, disjoint),
    ``"all"`` (default: the three flat splits concatenated, 21,919 cases) or ``"full"`` (ROME's
    ``counterfact.json`` with relation ids and all prompt families; 45 MB).

    Flat records: ``relation=None`` (the flat format has no relation ids), ``template=None``,
    ``prompt``, ``subject``, ``object`` = ``ground_truth``; ``extra = {"case_id", "split", "target_new",
    "rephrase_prompt", "locality_prompt", "locality_ground_truth"}``.
    Full records: ``relation`` = Wikidata id, ``template`` = ROME's template, ``prompt`` = template with
    the subject, ``object`` = ``target_true``; ``extra = {"case_id", "split": "full", "target_new",
    "target_new_id", "target_true_id", "pararel_idx", "paraphrase_prompts", "neighborhood_prompts",
    "attribute_prompts", "generation_prompts"}``.

    Args:
        path: a split file, or a data folder (``counterfact/counterfact-<split>.json`` or
            ``counterfact.json``); default: ``$FACTRACE_DATA_DIR``, the cache, or a download.
        split: see above; a list of flat split names is accepted too.
        base_url: where to download the flat splits from (default ``$FACTRACE_COUNTERFACT_URL`` or
            ``COUNTERFACT_FLAT_BASE``); files are checked against ``SHA256`` either way.
        as_frame, download, verify: as in :func:`load_known_1000`.

    Example::

        >>> val = load_counterfact(split="val")  # doctest: +SKIP
        >>> val[0].subject, val[0].object, val[0].extra["target_new"]  # doctest: +SKIP
        ('BBC One', 'BBC', 'Sega')
    """
    if split == "full":
        p = fetch("counterfact.json", path=path, download_ok=download, verify=verify)
        recs = []
        for d in _read_json(p):
            rw = d["requested_rewrite"]
            recs.append(FactRecord(
                subject=rw["subject"], relation=rw.get("relation_id"), prompt=rw["prompt"].replace("{}", rw["subject"]),
                object=rw["target_true"]["str"], template=rw["prompt"], source="counterfact",
                extra={"case_id": d.get("case_id"), "split": "full", "target_new": rw["target_new"]["str"],
                       "target_new_id": rw["target_new"].get("id"), "target_true_id": rw["target_true"].get("id"),
                       "pararel_idx": d.get("pararel_idx"),
                       "paraphrase_prompts": d.get("paraphrase_prompts"),
                       "neighborhood_prompts": d.get("neighborhood_prompts"),
                       "attribute_prompts": d.get("attribute_prompts"),
                       "generation_prompts": d.get("generation_prompts")}))
        return _out(recs, as_frame)
    splits = list(COUNTERFACT_SPLITS) if split == "all" else ([split] if isinstance(split, str) else list(split))
    bad = [s for s in splits if s not in COUNTERFACT_SPLITS]
    if bad:
        raise ValueError(f"unknown CounterFact split(s) {bad}; valid: {list(COUNTERFACT_SPLITS)}, 'all', 'full'")
    base = base_url or os.environ.get("FACTRACE_COUNTERFACT_URL") or COUNTERFACT_FLAT_BASE
    if not base.endswith("/"):
        base += "/"
    recs = []
    for s in splits:
        rel = f"counterfact/counterfact-{s}.json"
        if path is not None and Path(path).is_file():
            if len(splits) != 1:
                raise ValueError("path is a single file: pass one split")
            p = Path(path)
        elif path is not None:
            root = Path(path).expanduser()
            p = root / rel if (root / rel).exists() else root / f"counterfact-{s}.json"
            if not p.exists():
                raise FileNotFoundError(f"no {rel} under {root}")
        else:
            p = fetch(rel, download_ok=download, verify=verify, url=base + f"counterfact-{s}.json")
        for d in _read_json(p):
            recs.append(FactRecord(
                subject=d["subject"], relation=None, prompt=d["prompt"], object=d["ground_truth"],
                template=None, source="counterfact",
                extra={"case_id": d.get("case_id"), "split": s, "target_new": d.get("target_new"),
                       "rephrase_prompt": d.get("rephrase_prompt"), "locality_prompt": d.get("locality_prompt"),
                       "locality_ground_truth": d.get("locality_ground_truth")}))
    return _out(recs, as_frame)


# --------------------------------------------------------------------------------------------------
# factrace's own "Fact: ..." prompts
# --------------------------------------------------------------------------------------------------

def _facts_lines(path):
    if path is not None:
        text = Path(path).read_text(encoding="utf-8")
    else:
        text = resources.files("factrace").joinpath("data/facts.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_facts(path: str | os.PathLike | None = None, *, relations: str | Iterable[str] | None = None,
               as_frame: bool = False):
    """factrace's hand-written "Fact: ..." prompts (about 100 over 10 relations; Chughtai et al. style).

    The file ``factrace/data/facts.jsonl`` has two kinds of lines: relation lines
    ``{"type": "relation", "relation": ..., "template": "Fact: {} is in the country of",
    "candidates": [...]}`` and fact lines ``{"relation", "subject", "prompt", "object"}``. Each record's
    ``extra["candidates"]`` holds its relation's candidate attribute set (which includes the record's own
    object), so a logit difference against the other attributes of the same relation is possible;
    ``extra["distractors"]`` is the candidates minus the object. Objects have no leading space; use
    ``record.target`` for the ``" Italy"`` continuation.

    Args:
        path: another file in the same format (default: the packaged one).
        relations: restrict to these relation keys.
        as_frame: return a DataFrame.

    Example::

        >>> recs = load_facts(relations="landmark_country")
        >>> recs[0].prompt, recs[0].target
        ('Fact: The Colosseum is in the country of', ' Italy')
    """
    lines = _facts_lines(path)
    rel_info = {d["relation"]: d for d in lines if d.get("type") == "relation"}
    want = None if relations is None else ({relations} if isinstance(relations, str) else set(relations))
    if want is not None and want - set(rel_info):
        raise ValueError(f"unknown relation(s) {sorted(want - set(rel_info))}; known: {sorted(rel_info)}")
    recs = []
    for d in lines:
        if d.get("type") == "relation" or (want is not None and d["relation"] not in want):
            continue
        info = rel_info.get(d["relation"], {})
        cands = list(info.get("candidates", []))
        recs.append(FactRecord(
            subject=d["subject"], relation=d["relation"], prompt=d["prompt"], object=d["object"],
            template=d.get("template", info.get("template")), source="facts",
            relation_name=info.get("name"),
            extra={"candidates": cands, "distractors": [c for c in cands if c != d["object"]]}))
    return _out(recs, as_frame)


def facts_candidates(path: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """Relation key -> candidate attribute set (no leading spaces) of the ``facts`` dataset."""
    return {d["relation"]: list(d["candidates"]) for d in _facts_lines(path) if d.get("type") == "relation"}


# --------------------------------------------------------------------------------------------------
# Dispatch and validation
# --------------------------------------------------------------------------------------------------

def load_dataset(name: str, path: str | os.PathLike | None = None, **kwargs):
    """Load a dataset by name.

    Args:
        name: ``"known_1000"``, ``"relations"`` (alias ``"lre"``), ``"counterfact"`` or ``"facts"``
            (case-insensitive; ``-`` and ``_`` are interchangeable).
        path: forwarded to the loader.
        **kwargs: forwarded (``as_frame``, ``split``, ``relation_type``, ``names``, ...).

    Returns:
        ``list[FactRecord]`` or a ``pandas.DataFrame`` (``as_frame=True``).

    Raises:
        ValueError: unknown name (the message lists the valid ones).

    Example::

        >>> load_dataset("facts", as_frame=True).shape[0] >= 100
        True
    """
    key = str(name).lower().replace("-", "_")
    loaders = {"known_1000": load_known_1000, "known1000": load_known_1000, "relations": load_relations,
               "lre": load_relations, "counterfact": load_counterfact, "facts": load_facts}
    if key not in loaders:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return loaders[key](path, **kwargs)


def check_records(records: Sequence[FactRecord] | Any, *, raise_on_error: bool = True,
                  case_sensitive: bool = True) -> list[tuple[int, FactRecord]]:
    """Find records whose subject does not occur in their prompt (causal tracing needs the span).

    Args:
        records: list of :class:`FactRecord` (or dicts / a DataFrame with ``subject`` and ``prompt``).
        raise_on_error: raise :class:`SubjectNotInPromptError` listing the first offenders (default);
            with ``False`` just return them.
        case_sensitive: with ``False`` a case-insensitive occurrence is accepted.

    Returns:
        ``[(index, record), ...]`` of the offending records (empty when all are fine).

    Example::

        >>> check_records(load_known_1000())  # doctest: +SKIP
        []
    """
    if hasattr(records, "to_dict") and hasattr(records, "columns"):
        records = records.to_dict("records")
    bad = []
    for i, r in enumerate(records):
        subj, prompt = (r["subject"], r["prompt"]) if isinstance(r, dict) else (r.subject, r.prompt)
        ok = subj in prompt if case_sensitive else subj.lower() in prompt.lower()
        if not subj or not ok:
            bad.append((i, r))
    if bad and raise_on_error:
        show = "; ".join(
            f"#{i}: subject {(r['subject'] if isinstance(r, dict) else r.subject)!r} not in prompt "
            f"{(r['prompt'] if isinstance(r, dict) else r.prompt)!r}" for i, r in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise SubjectNotInPromptError(f"{len(bad)} of {len(records)} records have a subject that does not "
                                      f"occur in the prompt: {show}{more}")
    return bad
