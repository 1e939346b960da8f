"""factrace.study.report: the cross-architecture report on tiny fixture models (files, resume, bad inputs),
looked at in a real headless browser, and once on the real models (realmodel)."""
import json
import re
import os
import shutil
import subprocess

import numpy as np
import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("pyarrow")
pytest.importorskip("matplotlib")

import factrace  # noqa: E402
from factrace.study import report as R  # noqa: E402
from factrace.study import stages as S  # noqa: E402

from conftest import FIXTURES, SHARED_DATA  # noqa: E402

MODELS = [str(FIXTURES / "gpt2"), str(FIXTURES / "llama_gqa2_tied")]
SUBJECTS = ["The Eiffel Tower", "Big Ben", "The Colosseum", "Mount Fuji"]


def hash_encoder(words):
    """A deterministic stand-in for the sentence encoder (no model download, fast)."""
    out = []
    for w in words:
        v = np.random.RandomState(sum(map(ord, w.lower())) % 2**31).randn(8)
        out.append(v / np.linalg.norm(v))
    return np.array(out)


@pytest.fixture(autouse=True)
def one_blas_thread():
    """Tiny matrices: one BLAS thread is many times faster than several on a busy machine."""
    old = factrace.get_num_threads()
    factrace.set_num_threads(1)
    yield
    factrace.set_num_threads(old)


@pytest.fixture
def records_file(tmp_path):
    p = tmp_path / "facts.jsonl"
    p.write_text("\n".join(json.dumps(dict(prompt=f"{s} is located in the city of", subject=s, attribute="Paris"))
                           for s in SUBJECTS))
    return p


def small(out, dataset, models=MODELS, **kw):
    args = dict(n=3, out=out, samples=2, known_only=False, objects=True, encoder=hash_encoder, progress=False,
                chunk=1)
    args.update(kw)
    return R.run_report(models, dataset, **args)


@pytest.fixture
def done(tmp_path, records_file):
    out = tmp_path / "rep"
    return small(out, records_file), out, records_file


def test_files_and_numbers(done):
    res, out, _ = done
    assert res.markdown.exists() and res.html.exists()
    for f in ("restoration", "severing", "knockout", "gini"):
        assert (out / "figures" / f"{f}.png").stat().st_size > 1000
    for t in ("summary", "peaks", "restoration_last_subject", "restoration_averages", "severing", "knockout",
              "gini", "raw_restoration", "raw_severing", "raw_knockout", "facts"):
        a = pd.read_csv(out / "tables" / f"{t}.csv")
        b = pd.read_parquet(out / "tables" / f"{t}.parquet")
        assert len(a) == len(b) > 0, t
    for lab in ("gpt2", "llama_gqa2_tied"):
        man = json.loads((out / "data" / lab / "manifest.json").read_text())
        assert set(man["stages"]) == set(R.STAGES)
        for st in R.STAGES:
            assert (out / "data" / lab / f"{st}.parquet").exists()
        assert not (out / "data" / lab / "parts").exists()
    summ = res.tables["summary"].set_index("model")
    assert list(summ.traced) == [3, 3] and list(summ.records) == [4, 4]
    peaks = res.tables["peaks"]
    assert set(peaks.module) == {"hidden", "mlp", "attn"} and set(peaks.model) == {"gpt2", "llama_gqa2_tied"}
    ko = res.tables["raw_knockout"]
    assert ko.objects_rate.between(0, 100).all() and set(ko.kind) == {"mlp", "attn"}
    md = res.markdown.read_text()
    assert "Where recall peaks" in md and "figures/restoration.png" in md and "gpt2" in md
    html = res.html.read_text()
    assert html.count("<img") == 4 and "<table>" in html
    # the restoration numbers are the library's: the per-fact last-subject row of trace_all
    m = factrace.load(MODELS[0])
    rest = pd.read_parquet(out / "data" / "gpt2" / "restoration.parquet")
    rec = json.loads(done[2].read_text().splitlines()[0])
    noise = json.loads((out / "data" / "gpt2" / "manifest.json").read_text())["stages"]["known"]["meta"]["noise"]
    tr = factrace.trace(m, rec["prompt"], rec["subject"], kind="mlp", samples=2, noise=noise,
                        add_special_tokens=False)
    b, e = tr.subject_range
    got = rest[(rest.fact == 0) & (rest.kind == "mlp") & (rest.position == e - 1)].sort_values("layer").effect
    np.testing.assert_allclose(got.to_numpy(), tr.effect[e - 1], rtol=1e-6, atol=1e-9)


def test_report_on_parallel_residual_models(tmp_path, records_file):
    """Pythia-style GPT-NeoX and GPT-J (parallel blocks, partial rotary) through every stage of the report."""
    names = ["pythia_parallel", "gptj"]
    res = small(tmp_path / "rep", records_file, models=[str(FIXTURES / n) for n in names])
    summ = res.tables["summary"].set_index("model")
    assert list(summ.traced) == [3, 3]
    assert set(res.tables["peaks"].model) == set(names) and set(res.tables["raw_severing"].model) == set(names)
    assert set(res.tables["raw_knockout"].kind) == {"mlp", "attn"} and len(res.tables["gini"]) > 0
    assert res.html.exists() and "pythia_parallel" in res.markdown.read_text()


def test_resume_recomputes_only_the_deleted_stage(done):
    res, out, data = done
    before = pd.read_csv(out / "tables" / "severing.csv")
    (out / "data" / "gpt2" / "severing.parquet").unlink()
    res2 = small(out, data)
    assert res2.computed == [("gpt2", "severing")]
    assert len(res2.reused) == 2 * len(R.STAGES) - 1
    pd.testing.assert_frame_equal(before, pd.read_csv(out / "tables" / "severing.csv"))
    # a half-written (truncated) stage file is not taken as done
    p = out / "data" / "llama_gqa2_tied" / "knockout.parquet"
    p.write_bytes(p.read_bytes()[:100])
    res3 = small(out, data)
    assert res3.computed == [("llama_gqa2_tied", "knockout")]
    # other settings: everything is recomputed
    res4 = small(out, data, models=MODELS[:1], samples=3)
    assert len(res4.computed) == len(R.STAGES) and not res4.reused


def test_interrupted_stage_resumes_from_finished_chunks(tmp_path, records_file, monkeypatch):
    out = tmp_path / "rep"
    real = S._stage_knockout
    calls, crash = [], [True]

    def flaky(m, facts, *a, **k):
        calls.append(facts[0]["fact"])
        if crash[0] and len(calls) == 2:  # a crash (or Ctrl-C) in the middle of the stage
            raise RuntimeError("simulated interruption")
        return real(m, facts, *a, **k)

    monkeypatch.setattr(S, "_stage_knockout", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        small(out, records_file, models=MODELS[:1])
    d = out / "data" / "gpt2"
    man = json.loads((d / "manifest.json").read_text())
    assert "knockout" not in man["stages"] and "gini" not in man["stages"]
    assert {"known", "restoration", "severing"} <= set(man["stages"])
    assert not (d / "knockout.parquet").exists()
    parts = list((d / "parts").glob("knockout-*/*.parquet"))
    assert len(parts) == 1  # the first chunk finished and was kept
    assert not list(d.rglob("*.tmp"))
    calls.clear()
    crash[0] = False
    res = small(out, records_file, models=MODELS[:1])
    assert calls == [1, 2]  # fact 0's chunk is reused
    assert res.computed == [("gpt2", "knockout"), ("gpt2", "gini")]
    assert len(pd.read_parquet(d / "knockout.parquet").fact.unique()) == 3


def test_bad_inputs(tmp_path, records_file):
    with pytest.raises(ValueError, match="unknown dataset"):
        R.run_report(MODELS[:1], "no_such_dataset", out=tmp_path / "x")
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        small(f, records_file)
    with pytest.raises(ValueError, match="n must be"):
        small(tmp_path / "y", records_file, n=0)
    recs = [dict(prompt="Big Ben is located in the city of", subject="Big Ben", attribute="London"),
            dict(prompt="The Colosseum is located in", subject="Mount Fuji", attribute="Rome"),   # not in prompt
            dict(prompt="The Colosseum is located in", subject=" ", attribute="Rome"),            # no token
            dict(prompt="The Colosseum is located in", subject="Colosseum", attribute="")]        # no attribute
    with pytest.warns(UserWarning, match="3 of 4 records cannot be traced"):
        res = small(tmp_path / "z", recs, models=MODELS[:1])
    rej = pd.read_csv(tmp_path / "z" / "tables" / "rejected.csv")
    reasons = " ".join(rej.reason)
    assert "is not in the prompt" in reasons and "tokenizes to nothing" in reasons and "lacks" in reasons
    assert "cannot be traced" in res.markdown.read_text()
    with pytest.raises(ValueError, match="none of the 2 records"):
        small(tmp_path / "w", recs[1:3], models=MODELS[:1])
    # a model that knows none of the facts: the report says so and is still written
    unknown = [dict(prompt=f"{s} is located in the city of", subject=s, attribute="Zzqxv") for s in SUBJECTS]
    res = small(tmp_path / "u", unknown, models=MODELS[:1], known_only=True)
    assert "knows none of the 4 usable facts" in res.markdown.read_text()
    assert res.html.exists() and res.tables["summary"].traced.tolist() == [0]


def test_cli(tmp_path, records_file, capsys):
    from factrace import cli

    assert cli.main(["report", "--model", MODELS[0], "--dataset", "nope", "--out", str(tmp_path / "c")]) == 2
    assert "unknown dataset" in capsys.readouterr().err
    rc = cli.main(["report", "--model", MODELS[0], "--dataset", str(records_file), "--n", "1", "--samples", "1",
                   "--kind", "hidden", "--no-objects", "--no-progress", "--out", str(tmp_path / "c")])
    assert rc == 0 and (tmp_path / "c" / "report.html").exists()


# ---------------------------------------------------------------------------------------------
# a real browser

CHROMIUM = next((shutil.which(c) for c in ("chromium", "chromium-browser", "google-chrome", "chrome")
                 if shutil.which(c)), None)
PROBE = """<script>window.addEventListener('load', function () {
  var r = [];
  document.querySelectorAll('img').forEach(function (i) {
    var b = i.getBoundingClientRect();
    r.push([i.getAttribute('src'), i.naturalWidth, i.naturalHeight, b.left, b.top, b.width, b.height]); });
  var p = document.createElement('pre'); p.id = 'probe'; p.textContent = JSON.stringify(r);
  document.body.appendChild(p);
});</script>"""
SIZE = "--window-size=1200,5000"
BROWSER = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           "--no-first-run", "--virtual-time-budget=5000"]


@pytest.mark.skipif(CHROMIUM is None, reason="headless chromium not installed (apt-get install -y chromium)")
def test_html_renders_in_headless_chromium(done, tmp_path):
    res, out, _ = done
    # the browser must not inherit a sanitizer preload (tools/sanitize.sh runs this suite under ASan)
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")}
    html = res.html.read_text()
    # the report itself, with a probe script that writes each image's decoded size into the DOM
    probe = out / "report_probe.html"
    probe.write_text(html.replace("</body>", PROBE + "</body>"))
    dom = subprocess.run(BROWSER + [SIZE, "--dump-dom", probe.resolve().as_uri()], capture_output=True, text=True,
                         timeout=120, env=env).stdout
    imgs = _probe(dom)
    assert len(imgs) == 4
    from matplotlib.image import imread

    for src, w, h, *_ in imgs:
        png = imread(out / src)
        assert (w, h) == (png.shape[1], png.shape[0]), src  # decoded by the browser at its true size
    # a broken image is caught by the same probe
    broken = out / "broken_probe.html"
    broken.write_text(html.replace("figures/gini.png", "figures/missing.png").replace("</body>", PROBE + "</body>"))
    dom = subprocess.run(BROWSER + [SIZE, "--dump-dom", broken.resolve().as_uri()], capture_output=True, text=True,
                         timeout=120, env=env).stdout
    assert [w for s, w, *_ in _probe(dom) if "missing" in s] == [0]
    # a screenshot of the page as it is (same window size as the probe): where each image sits, the
    # pixels show a figure (ink on white), not an empty box
    shot = tmp_path / "shot.png"
    subprocess.run(BROWSER + [SIZE, f"--screenshot={shot}", res.html.resolve().as_uri()],
                   capture_output=True, timeout=120, check=True, env=env)
    a = imread(shot)[..., :3]
    seen = 0
    for src, w, h, x, y, bw, bh in imgs:
        x0, y0, x1, y1 = int(x) + 2, int(y) + 2, int(x + bw) - 2, int(y + bh) - 2
        if y1 > a.shape[0] or bw < 50:
            continue
        crop = a[y0:y1, x0:x1]
        ink = (crop.min(-1) < 0.8).mean()
        assert 0.01 < ink < 0.9 and crop.std() > 0.05, (src, ink, crop.std())
        seen += 1
    assert seen >= 3
    # the text above the figures is there too
    assert (a[:200].min(-1) < 0.5).mean() > 0.001


def _probe(dom):
    mo = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert mo, dom[-2000:]
    return json.loads(mo.group(1).replace("&quot;", '"'))


# ---------------------------------------------------------------------------------------------
# the real models


@pytest.mark.realmodel
def test_report_on_real_models(tmp_path):
    from factrace.io import packaged

    if not all(packaged.is_installed(x) for x in ("smollm2", "gemma3-270m")):
        pytest.skip("smollm2 / gemma3-270m not installed")
    if not (SHARED_DATA / "known_1000.json").exists():
        pytest.skip("known_1000.json not in ../shared/data")
    from factrace.study.datasets import load_dataset

    records = load_dataset("known_1000", SHARED_DATA)[:100]  # bound the known-fact scan
    res = R.run_report(["smollm2", "gemma3-270m"], records, n=3, out=tmp_path / "r", samples=2, objects=None,
                       progress=False)
    summ = res.tables["summary"].set_index("model")
    assert summ.loc["smollm2", "traced"] == 3 and summ.loc["smollm2", "layers"] == 30
    assert summ.loc["gemma3-270m", "layers"] == 18
    peaks = res.tables["peaks"]
    assert set(peaks[peaks.model == "smollm2"].module) == {"hidden", "mlp", "attn"}
    assert res.html.exists() and (tmp_path / "r" / "figures" / "restoration.png").exists()
    if summ.loc["gemma3-270m", "traced"] == 0:
        assert "gemma3-270m knows none" in res.markdown.read_text()


def test_mean_band_table():
    """The per-layer tables of the report: means, 95% bands (1.96 sd / sqrt n) and n, hand-computed."""
    import pandas as pd

    from factrace.study.report_output import _mean_band

    df = pd.DataFrame({"layer": [0, 0, 0, 1], "effect": [1.0, 2.0, 6.0, 4.0], "clean": [5.0, 5.0, 8.0, 1.0]})
    t = _mean_band(df.groupby("layer"), [("effect", "band"), ("clean", None)])
    assert list(t.columns) == ["layer", "effect", "band", "clean", "n"]
    assert t.effect.tolist() == [3.0, 4.0] and t.clean.tolist() == [6.0, 1.0] and t.n.tolist() == [3, 1]
    assert t.band[0] == pytest.approx(1.96 * np.std([1.0, 2.0, 6.0]) / np.sqrt(3)) and t.band[1] == 0.0
