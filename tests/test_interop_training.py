"""Fine-tuning a Hugging Face model under a parallel layout, then exporting it back:
the exported directory's logits in `transformers` equal meshlm's."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from meshlm.artifacts.weights_file import load_weights  # noqa: E402
from meshlm.data.loader import TokenDataset, train_batch  # noqa: E402
from meshlm.data.prepare import prepare_data  # noqa: E402
from meshlm.data.tokenizer import train_tokenizer  # noqa: E402
from meshlm.distributed.spawn import run_distributed  # noqa: E402
from meshlm.interop import export_hf  # noqa: E402
from meshlm.interop.init_from_hf import load_training_config  # noqa: E402
from meshlm.train.metrics import read_metrics  # noqa: E402
from meshlm.train.trainer import train  # noqa: E402

TEXT = "\n".join(f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400))


def make_hf_dir(path, arch: str):
    torch.manual_seed(0)
    tok = train_tokenizer([TEXT], 300, path / "tokenizer.json")
    if arch == "llama":
        config = transformers.LlamaConfig(
            vocab_size=301,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(
            vocab_size=301, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
        )
        model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(path, safe_serialization=True)
    return tok


def _train(rank, cfg, out):
    train(cfg, out, log=lambda *a, **k: None)


@pytest.mark.parametrize(
    "arch, world, layout",
    [
        ("llama", 4, ["parallel.dp=2", "parallel.tp=2"]),
        ("gpt2", 2, ["parallel.tp=2"]),
    ],
)
def test_finetune_from_hf_then_export_matches_transformers(tmp_path, arch, world, layout):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    make_hf_dir(hf_dir, arch)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"doc{i:02d}.py").write_text(TEXT[i * 500 : (i + 3) * 500])
    cfg = load_training_config(
        None,
        [
            f'train.init_from_hf="{hf_dir}"',
            f'data.source="{corpus}"',
            f'data.cache_dir="{tmp_path / "cache"}"',
            "data.seq_len=32",
            "data.val_fraction=0.2",
            "train.steps=3",
            "train.micro_batch=2",
            "train.global_batch=4",
            "train.lr=0.001",
            "train.warmup_steps=1",
            "train.eval_every=0",
            "train.sample_tokens=0",
            "train.progress=false",
            *layout,
        ],
    )
    assert (cfg.model.arch, cfg.model.vocab_size, cfg.model.d_model) == (arch, 301, 64)
    data_dir = prepare_data(cfg.data, cfg.model.vocab_size, log=lambda *a, **k: None)
    run = tmp_path / "run"
    run_distributed(_train, world, cfg, run)

    # Training started from the Hugging Face weights: step 1's loss is the HF model's loss on that batch.
    hf_start = getattr(transformers, "LlamaForCausalLM" if arch == "llama" else "GPT2LMHeadModel").from_pretrained(
        hf_dir
    )
    x, y = train_batch(
        TokenDataset(data_dir, "train"), cfg.data.seq_len, cfg.train.seed, 0, range(cfg.train.global_batch)
    )
    with torch.no_grad():
        start_loss = torch.nn.functional.cross_entropy(hf_start(x).logits.flatten(0, 1), y.flatten()).item()
    first = read_metrics(run / "metrics.jsonl")[0]["loss"]
    assert math.isclose(first, start_loss, rel_tol=1e-5), (first, start_loss)

    out = export_hf(run, tmp_path / "exported")
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours = load_weights(run / "model.safetensors", cfg.model).eval()
    ids = torch.randint(0, 301, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(ids) - exported(ids).logits).abs().max().item()
        moved = (ours(ids) - hf_start(ids).logits).abs().max().item()
    assert diff <= 1e-4
    assert moved > 1e-4  # three steps changed the model: the comparison is of the trained weights


def test_convert_cli_round_trip_and_generate(tmp_path):
    import subprocess
    import sys

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    make_hf_dir(hf_dir, "llama")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "meshlm", *args], capture_output=True, text=True)

    assert cli("convert", "--from-hf", str(hf_dir), "--out", str(tmp_path / "run")).returncode == 0
    gen = cli(
        "generate", "--run", str(tmp_path / "run"), "--prompt", "def ", "--temperature", "0", "--max-new-tokens", "5"
    )
    assert gen.returncode == 0 and gen.stdout.startswith("def ")
    assert cli("convert", "--to-hf", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "back")).returncode == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    original = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    for (name, a), (_, b) in zip(original.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    refused = cli("convert", "--from-hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"))
    assert refused.returncode != 0 and "nowhere" in refused.stderr and "Traceback" not in refused.stderr


def test_generate_directly_from_a_hugging_face_directory(tmp_path):
    import subprocess
    import sys

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    make_hf_dir(hf_dir, "gpt2")
    cmd = [
        sys.executable,
        "-m",
        "meshlm",
        "generate",
        "--init-from-hf",
        str(hf_dir),
        "--prompt",
        "def ",
        "--temperature",
        "0",
        "--max-new-tokens",
        "6",
        "--ignore-eos",
    ]
    first, second = (subprocess.run(cmd, capture_output=True, text=True) for _ in range(2))
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.startswith("def ")
