"""Shared by every tier: tiny random models of every supported family and a tiny tokenizer, built in-process in
seconds; the tier marks.

Tiers are folders, and the folder decides a test's mark (`pytest_collection_modifyitems` below):
- tests/unit: in-process, tiny models, seconds each (`make test-fast` runs only these);
- tests/integration: subprocesses, torchrun, kill/resume, the CLI end to end on tiny models;
- tests/slow: the real embedded SmolLM2 model, fresh assets, anything beyond ~20 s.
Tests of one tier import helpers from test modules of another (`from test_curate import _cfg`), so every tier
folder is on sys.path; test file names are unique across tiers.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub

import pytest
import torch

TIERS = ("unit", "integration", "slow")
_HERE = Path(__file__).resolve().parent
for _tier in TIERS:
    if str(_HERE / _tier) not in sys.path:
        sys.path.insert(0, str(_HERE / _tier))


def pytest_collection_modifyitems(config, items):
    """Mark each test with its folder's tier (`-m "not slow"` / `-m unit` select by folder); a test outside the
    tier folders, or one marked `slow` outside tests/slow, is an error: the folder is the one declaration."""
    for item in items:
        path = Path(str(item.fspath)).resolve()
        rel = path.relative_to(_HERE) if path.is_relative_to(_HERE) else path
        tier = rel.parts[0] if path.is_relative_to(_HERE) and len(rel.parts) > 1 else None
        if tier not in TIERS:
            raise pytest.UsageError(f"{rel}: a test file must live in one of tests/{{{','.join(TIERS)}}}")
        if tier != "slow" and item.get_closest_marker("slow") is not None:
            raise pytest.UsageError(f"{rel}::{item.name}: marked slow but not in tests/slow (the folder is the tier)")
        item.add_marker(getattr(pytest.mark, tier))


FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma3")

CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "The court held that the contract was void because one party lacked capacity.",
    "def add(a, b):\n    return a + b\n",
    "The patient presented with fever and a persistent cough for three days.",
    "Shares rose 3% after the company reported strong quarterly earnings.",
    "What is 12 times 7? The answer is 84.",
] * 4

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(chat_template: str | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


def tiny_config(family: str, vocab_size: int, layers: int = 3):
    import transformers as tf

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(**common)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=8)
    if family == "gemma3":
        kinds = ["sliding_attention", "full_attention"] * layers
        return tf.Gemma3TextConfig(
            **{**common, "tie_word_embeddings": True},
            sliding_window=8,
            query_pre_attn_scalar=16,
            layer_types=kinds[:layers],
        )
    raise ValueError(family)


def build_model(family: str, vocab_size: int, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def chat_tokenizer():
    return build_tokenizer(CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, chat_tokenizer):
    """family → folder holding a saved tiny random model and the chat tokenizer."""
    out = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(f"tiny-{family}")
        build_model(family, len(chat_tokenizer)).save_pretrained(path)
        chat_tokenizer.save_pretrained(path)
        out[family] = path
    return out


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def hold_lock(path, ready):
    """Another process that holds `path`'s finescope lock (as a running stage would) until it is killed."""
    import subprocess
    import sys
    import textwrap
    import time
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src"
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(src)!r})
        from pathlib import Path
        from finescope import storage
        with storage.exclusive(Path({str(path)!r})):
            Path({str(ready)!r}).write_text("locked")
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    while not Path(ready).exists():
        assert proc.poll() is None and time.monotonic() < deadline, "lock holder did not start"
        time.sleep(0.05)
    return proc


def sandbox_capabilities() -> dict:
    """What this machine lets the code sandbox enforce (what the sandbox tests may expect): Landlock ABI (0 = none)
    and whether we can drop to an unprivileged user."""
    import ctypes

    abi = 0
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        abi = max(0, int(libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))))
    return {"landlock_abi": abi, "drops_privileges": os.geteuid() == 0}


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    """A private FINESCOPE_HOME (caches of curate, KD targets, models) for one test."""
    monkeypatch.setenv("FINESCOPE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    """Instruction and text records from CORPUS: the prune tests' calibration file."""
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    rows = [{"instruction": f"Say something about item {i}.", "response": text} for i, text in enumerate(CORPUS)]
    rows += [{"text": text} for text in CORPUS[:4]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def fake_curation(tmp_path: Path, pool: list[dict], best: int = 2) -> Path:
    """A curate stage folder: config.json naming the pool, scores.parquet (record i scores 0.1·i), selected.jsonl
    (the best `best`); returns selected.jsonl."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "curate"
    folder.mkdir()
    pool_file = tmp_path / "pool.jsonl"
    pool_file.write_text("".join(json.dumps(r) + "\n" for r in pool), encoding="utf-8")
    (folder / "config.json").write_text(json.dumps({"config": {"pool": str(pool_file)}}))
    scores = [0.1 * i for i in range(len(pool))]
    pq.write_table(pa.table({"id": [r["id"] for r in pool], "score": scores}), folder / "scores.parquet")
    selected = folder / "selected.jsonl"
    selected.write_text("".join(json.dumps(r) + "\n" for r in pool[::-1][:best]), encoding="utf-8")
    return selected
