"""The `factrace` command line on a tiny fixture model: every main job runs and writes its files."""
import pytest

from factrace import cli
from conftest import FIXTURES

MODEL = str(FIXTURES / "gpt2")
PROMPT = "The quick brown fox jumps over the lazy dog"
# GPT-2, and the parallel-residual architectures (GPT-NeoX / Pythia, GPT-J: no resid_mid)
MODELS = [MODEL, str(FIXTURES / "pythia_parallel"), str(FIXTURES / "gptj")]


@pytest.mark.parametrize("model", MODELS)
def test_run(tmp_path, capsys, model):
    assert cli.main(["run", "--model", model, "--prompt", PROMPT, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "top next tokens" in out and "head_out" in out
    assert (tmp_path / "run.npz").exists()


@pytest.mark.parametrize("model", MODELS)
def test_trace(tmp_path, capsys, model):
    rc = cli.main(["trace", "--model", model, "--prompt", PROMPT, "--subject", "brown fox", "--samples", "2",
                   "--noise", "0.5", "--kind", "hidden", "--out", str(tmp_path)])
    assert rc == 0
    assert "hidden strongest restoration" in capsys.readouterr().out
    assert (tmp_path / "trace_hidden.png").stat().st_size > 1000 and (tmp_path / "trace.csv").exists()


@pytest.mark.parametrize("model", MODELS)
def test_dla_and_lens(tmp_path, capsys, model):
    assert cli.main(["dla", "--model", model, "--prompt", PROMPT, "--subject", "brown fox", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "sum of all parts" in out and "mlp_boosting" in out
    assert (tmp_path / "dla.csv").exists() and (tmp_path / "dla_heads.png").exists()
    assert cli.main(["lens", "--model", model, "--prompt", PROMPT, "--out", str(tmp_path)]) == 0
    assert (tmp_path / "lens.png").exists() and (tmp_path / "lens.csv").exists()


def test_errors(tmp_path, capsys):
    assert cli.main(["trace", "--model", MODEL, "--prompt", PROMPT, "--subject", "purple cat"]) == 2
    assert "does not occur" in capsys.readouterr().err
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit, match="not a directory"):
        cli.main(["run", "--model", MODEL, "--prompt", PROMPT, "--out", str(f)])
