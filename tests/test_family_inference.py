"""`meshlm generate` and `meshlm predict` on a run of every family besides the transformer (whose
CLI tests are in test_inference.py): the engine over the family's own decode state. Generation
over 2 tensor-parallel processes equals one process token for token, and predict over 2
processes equals 1 (and tp 2 on the greedy lines). The decode states themselves:
tests/test_decode_state.py and each family's tests.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from meshlm.artifacts.weights_file import save_weights
from meshlm.cli import main as cli_main
from meshlm.config import Config, load_config
from meshlm.data.tokenizer import train_tokenizer
from meshlm.model.registry import build_model

V = 384  # rows: 192 per rank under tp 2
COMMON = [f"model.vocab_size={V}", "model.max_seq_len=128"]
# Small random models whose logits are spread out (greedy choices far from ties, so the tp2
# gathered logits pick the same tokens).
FAMILIES = {
    "lstm": [
        'model.family="lstm"',
        "model.d_embed=48",
        "model.d_hidden=64",
        "model.n_layers=2",
        "model.tie_embeddings=false",
        "model.init_range=0.5",
    ],
    "gcnn": ['model.family="gcnn"', "model.d_model=48", "model.n_layers=3", "model.init_std=0.5"],
    "maxent": ['model.family="maxent"', "model.order=3", "model.hash_rows=64", "model.init_std=2.0"],
    "hmm": ['model.family="hmm"', "model.n_states=16", "model.init_std=3.0"],
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_run(request, tmp_path_factory) -> Path:
    """A run directory (config.toml, model.safetensors, tokenizer.json) of a tiny random model."""
    out = tmp_path_factory.mktemp(f"{request.param}-run")
    cfg = load_config(None, COMMON + FAMILIES[request.param]).model
    save_weights(build_model(cfg, seed=0).state_dict(), cfg, out / "model.safetensors")
    (out / "config.toml").write_text(Config(model=cfg).to_toml())
    train_tokenizer([inspect.getsource(json.decoder) + inspect.getsource(textwrap)], V, out / "tokenizer.json")
    return out


def _cli(*args: str) -> subprocess.CompletedProcess:
    # CPU ranks (gloo) even on a GPU machine; the source tree, whatever an editable install points at
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "MESHLM_DEVICE": "cpu", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "meshlm", *args], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_generate_tp2_equals_one_process(family_run, capsys):
    args = ["generate", "--run", str(family_run), "--prompt", "def ", "--prompt", "import sys\n", "--prompt", "x"]
    args += ["--temperature", "0", "--max-new-tokens", "24", "--ignore-eos", "--max-batch", "2"]
    assert cli_main(args) == 0  # one process: in this one
    one = capsys.readouterr().out
    assert len(one) > 3 * 10  # three prompts and their continuations
    assert _cli(*args, "--tp", "2").stdout == one


def test_predict_nproc_2_equals_nproc_1_and_tp2(family_run, tmp_path):
    src = tmp_path / "in.jsonl"
    lines = [
        {"prompt": "def f(x):", "max_new_tokens": 12, "id": "a"},
        {"prompt": "class A:", "temperature": 1.0, "top_k": 20, "max_new_tokens": 9},
        {"prompt": "import os", "max_new_tokens": 20, "temperature": 0.8, "seed": 4},
        {"prompt": "return", "max_new_tokens": 5, "temperature": 1.2},
        {"prompt": "for i in", "max_new_tokens": 16},
    ]
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    records = {}
    for name, extra in (("n1", []), ("n2", ["--nproc", "2"]), ("tp2", ["--nproc", "2", "--tp", "2"])):
        out = tmp_path / f"{name}.jsonl"
        args = ["predict", "--run", str(family_run), "--input", str(src), "--output", str(out), "--seed", "1", *extra]
        if extra:
            _cli(*args)
        else:
            assert cli_main(args) == 0
        records[name] = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in records["n1"]] == [1, 2, 3, 4, 5]
    assert all(r["completion_tokens"] > 0 for r in records["n1"])
    assert records["n2"] == records["n1"]
    # tensor parallel: the greedy lines (no temperature given) token for token; sampled lines may
    # part after a near-tie of the gathered logits
    assert [r["line"] for r in records["tp2"]] == [1, 2, 3, 4, 5]
    for i in (0, 4):
        assert records["tp2"][i] == records["n1"][i]
