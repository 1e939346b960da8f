"""mechanism_ablation: hand-built cases (a group whose output is zero changes nothing; ablating every head
and MLP gives the mean-ablated model computed with full runs), the one-row engine equals full runs, the
result's tables and plot; SmolLM2 over the shipped facts set (realmodel)."""
import numpy as np
import pytest

import factrace
import factrace.interventions as fi
from conftest import FIXTURES, fixture_model
from factrace.methods import mechanisms as M
from factrace.study.datasets import load_dataset

RECS = load_dataset("facts")[::7]  # 16 records over the ten relations


def _targets(m):
    return M._targets(m, [M._record_fields(r) for r in RECS], RECS)


def _ld(logits, a, neg):
    lg = logits.astype(np.float64)
    return lg[a] - (lg[neg].mean() if neg else 0.0)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa2_tied", "gemma3", "pythia_parallel"])
def test_default_classification_and_tables(name):
    m = fixture_model(name)
    res = factrace.mechanism_ablation(m, RECS, min_frac=0.02, share=0.4, mixed_share=0.2)
    assert list(res.groups) == ["subject_heads", "relation_heads", "mixed_heads", "mlps"]
    assert res.groups["mlps"] == list(range(m.config.n_layers))
    for g in M.HEAD_GROUPS:
        assert all(res.head_classes[l, h] == g.split("_")[0] for l, h in res.groups[g])
    f = res.frame
    assert len(f) == 1 + 4 + 4 + 1 and list(f["kind"]).count("single") == 4
    assert f.loc[0, "drop"] == 0 and f.loc[0, "accuracy_drop"] == 0
    assert len(res.per_prompt) == len(f) * len(RECS)
    add = res.additivity()
    assert add["sum_single_drops"] == pytest.approx(sum(add["groups"][g]["drop"] for g in res.groups))
    assert add["joint_drop"] == pytest.approx(float(f[f["condition"] == "ablate all"]["drop"].iloc[0]))
    ind = res.independence()
    assert list(ind["group"]) == list(res.groups) and np.isfinite(ind["dla_clean"]).all()
    assert res.table().shape[0] == 10 and res.plot() is not None and "MechanismAblation" in res._repr_html_()
    # the clean condition (one row per prompt on the cached prefix) equals full runs
    tg = _targets(m)
    for rec, (a, neg), ld in zip(RECS, tg, res.per_prompt[res.per_prompt["kind"] == "none"]["logit_diff"]):
        full = m.run(m.encode(rec.prompt), logits="last").logits[0]
        assert abs(_ld(full, a, neg) - ld) <= 1e-5 * max(1, abs(ld))


def _dead_head_model(name, l, h):
    m = factrace.load(FIXTURES / name, weights="float32")
    w = dict(m.weights)
    WO = np.array(m.W("W_O", l))
    dh = m.config.d_head
    WO[:, h * dh:(h + 1) * dh] = 0
    w[f"blocks.{l}.W_O"] = WO
    for k in [k for k in w if k.endswith(("W_QKV", "W_gate_up"))]:
        del w[k]  # re-fused by the constructor
    return factrace.Model(m.config, w, m.tokenizer, name=name + "-dead-head")


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa2_tied"])
def test_a_group_whose_output_is_zero_changes_nothing(name):
    L = fixture_model(name).config.n_layers
    m = _dead_head_model(name, L - 1, 1)
    for ablation in ("mean", "zero"):
        res = factrace.mechanism_ablation(m, RECS, groups={"dead": [(L - 1, 1)], "mlp_first": [0]}, ablation=ablation)
        f = res.frame.set_index("condition")
        assert f.loc["clean", "dla_dead"] == 0.0
        assert abs(f.loc["ablate dead", "drop"]) <= 1e-6 and f.loc["ablate dead", "accuracy_drop"] == 0
        np.testing.assert_allclose(f.loc["ablate all", "logit_diff"], f.loc["ablate mlp_first", "logit_diff"], atol=1e-6)
        np.testing.assert_allclose(f.loc["ablate all but dead", "dla_dead"], 0.0, atol=1e-12)


@pytest.mark.parametrize("name", ["gpt2", "gemma3", "pythia_parallel"])
def test_ablating_everything_is_the_mean_ablated_model(name):
    """Every head and every MLP in a group, all ablated at END: the per-prompt logit differences equal full
    runs of the public API with each head's z and each MLP's output at END set to its dataset mean (the
    means taken from full runs too)."""
    m = fixture_model(name)
    c = m.config
    L, H = c.n_layers, c.n_heads
    groups = {"even_heads": [(l, h) for l in range(L) for h in range(0, H, 2)],
              "odd_heads": [(l, h) for l in range(L) for h in range(1, H, 2)], "mlps": list(range(L))}
    res = factrace.mechanism_ablation(m, RECS, groups=groups)
    runs = [m.run(m.encode(r.prompt), capture=["z", "mlp_out"], logits="last") for r in RECS]
    z_mean = np.mean([r.z[:, -1] for r in runs], 0, dtype=np.float64).astype(np.float32)      # (L, H, dh)
    mlp_mean = np.mean([r.mlp_out[:, -1] for r in runs], 0, dtype=np.float64).astype(np.float32)  # (L, d)
    ivs = [fi.set_values("z", z_mean[:, None], positions=[-1]), fi.set_values("mlp_out", mlp_mean[:, None], positions=[-1])]
    got = res.per_prompt[res.per_prompt["condition"] == "ablate all"]["logit_diff"].to_numpy()
    for rec, (a, neg), g in zip(RECS, _targets(m), got):
        want = _ld(m.run(m.encode(rec.prompt), interventions=ivs, logits="last").logits[0], a, neg)
        assert abs(want - g) <= 1e-5 * max(1, abs(want))
    # and one group alone, with zero ablation
    res0 = factrace.mechanism_ablation(m, RECS, groups=groups, ablation="zero")
    got = res0.per_prompt[res0.per_prompt["condition"] == "ablate odd_heads"]["logit_diff"].to_numpy()
    for rec, (a, neg), g in zip(RECS, _targets(m), got):
        iv = fi.zero("z", heads=list(range(1, H, 2)), positions=[-1])
        want = _ld(m.run(m.encode(rec.prompt), interventions=[iv], logits="last").logits[0], a, neg)
        assert abs(want - g) <= 1e-5 * max(1, abs(want))


def test_group_dla_is_the_dla_of_its_components():
    """In the clean condition each group's DLA is the sum of factrace.dla's parts for its components."""
    m = fixture_model("llama_gqa2_tied")
    groups = {"h": [(0, 1), (1, 3)], "mlps": [1]}
    res = factrace.mechanism_ablation(m, RECS[:4], groups=groups)
    clean = res.per_prompt[res.per_prompt["kind"] == "none"]
    for rec, (a, neg), (_, row) in zip(RECS[:4], _targets(m)[:4], clean.iterrows()):
        d = factrace.dla(m, rec.prompt, (a, neg) if neg else a)
        assert abs(row["dla_h"] - (d.heads[0, 1] + d.heads[1, 3])) <= 1e-4
        assert abs(row["dla_mlps"] - (d.mlp[1] + d.mlp_bias[1])) <= 1e-4


def test_refusals():
    m = fixture_model("gpt2")
    with pytest.raises(ValueError, match="ablation"):
        factrace.mechanism_ablation(m, RECS, ablation="resample")
    with pytest.raises(ValueError, match="no records"):
        factrace.mechanism_ablation(m, [])


@pytest.mark.realmodel
def test_smollm2_facts():
    from factrace.io import packaged

    if not packaged.is_installed("smollm2"):
        pytest.skip("smollm2 is not installed")
    m = factrace.load("smollm2")
    res = factrace.mechanism_ablation(m, load_dataset("facts"))
    f = res.frame.set_index("condition")
    assert f.loc["clean", "accuracy"] > 0.5 and f.loc["clean", "logit_diff"] > 1
    assert sum(len(v) for k, v in res.groups.items() if k != "mlps") > 0
    assert f.loc["ablate all", "drop"] > 0  # ablating every mechanism hurts
    assert f.loc["ablate all", "accuracy"] < f.loc["clean", "accuracy"]
