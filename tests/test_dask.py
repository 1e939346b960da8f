"""trace_dataset / run_report on a Dask cluster give the same numbers as the local run."""
import json

import pytest

pd = pytest.importorskip("pandas")
distributed = pytest.importorskip("dask.distributed")

import factrace  # noqa: E402

from conftest import FIXTURES  # noqa: E402

RECORDS = [dict(prompt=f"{s} is located in the city of", subject=s, attribute="Paris")
           for s in ("The Eiffel Tower", "Big Ben", "The Colosseum", "Mount Fuji", "Table Mountain")]


@pytest.fixture(scope="module")
def client():
    old = factrace.get_num_threads()
    factrace.set_num_threads(1)
    cluster = distributed.LocalCluster(processes=False, n_workers=2, threads_per_worker=1, dashboard_address=None)
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()
    factrace.set_num_threads(old)


@pytest.mark.parametrize("name", ["gpt2", "qwen2"])
def test_trace_dataset_on_dask_equals_local(client, name):
    m = factrace.load(FIXTURES / name)
    kw = dict(samples=3, known_only=False, progress=False, add_special_tokens=False, chunk=2)
    local = factrace.trace_dataset(m, RECORDS, **kw)
    remote = factrace.trace_dataset(m, RECORDS, client=client, **kw)
    assert len(local.facts) == len(RECORDS) and not remote.interrupted
    pd.testing.assert_frame_equal(local.frame, remote.frame)
    pd.testing.assert_frame_equal(local.facts, remote.facts)
    pd.testing.assert_frame_equal(local.averages(), remote.averages())


def test_dask_needs_a_model_source(client):
    m = factrace.load(FIXTURES / "gpt2")
    m.source = None
    with pytest.raises(ValueError, match="source"):
        factrace.trace_dataset(m, RECORDS, client=client, known_only=False, progress=False)


def test_report_on_dask_equals_local(client, tmp_path):
    from factrace.study.report import run_report

    kw = dict(n=3, samples=2, known_only=False, objects=False, progress=False)
    a = run_report([str(FIXTURES / "llama_gqa2_tied")], RECORDS, out=tmp_path / "local", **kw)
    b = run_report([str(FIXTURES / "llama_gqa2_tied")], RECORDS, out=tmp_path / "dask", client=client, **kw)
    for t in ("raw_restoration", "restoration_last_subject", "gini", "peaks"):
        pd.testing.assert_frame_equal(a.tables[t], b.tables[t])
    assert json.loads((tmp_path / "dask" / "data" / "llama_gqa2_tied" / "manifest.json").read_text())["stages"]
