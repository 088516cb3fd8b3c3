from __future__ import annotations

import json
import shutil

import pytest
import torch

from finescope.modeling import ArchAdapter, ModelError, format_info, load, model_info


def _batch(tokenizer):
    tokenizer.padding_side = "left"
    return tokenizer(
        ["What is 12 times 7?", "Shares rose after strong earnings were reported by the company."],
        return_tensors="pt",
        padding=True,
    )


def test_load_folder_and_adapter_shapes(tiny_model_dirs, family):
    h = load(tiny_model_dirs[family], device="cpu")
    a = h.adapter
    assert a.family.lower().startswith(family[:4])
    assert (a.num_layers, a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim, a.intermediate_size) == (
        3,
        64,
        4,
        2,
        16,
        96,
    )
    assert h.tokenizer is not None and h.model.dtype == torch.float32
    for i in range(a.num_layers):
        att, mlp = a.attention(i), a.mlp(i)
        assert att.q_proj.out_features == a.num_heads * a.head_dim
        assert att.k_proj.out_features == att.v_proj.out_features == a.num_kv_heads * a.head_dim
        assert att.o_proj.in_features == a.num_heads * a.head_dim
        assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == 96
        has_norm = family in ("qwen3", "gemma3")
        assert (att.q_norm is not None, att.k_norm is not None) == (has_norm, has_norm)


@pytest.mark.parametrize("layer", [0, 1])
def test_truncated_forward_equals_full_hidden_state(tiny_model_dirs, family, layer):
    h = load(tiny_model_dirs[family], device="cpu")
    batch = _batch(h.tokenizer)
    with torch.no_grad():
        full = h.model(**batch, output_hidden_states=True).hidden_states
        part = h.adapter.hidden_after(layer, **batch)
    mask = batch["attention_mask"].bool()
    # hidden_states[0] is the embedding output, so block ℓ's output is hidden_states[ℓ + 1].
    torch.testing.assert_close(part[mask], full[layer + 1][mask], rtol=1e-5, atol=1e-5)


def test_truncated_forward_last_block_matches_pre_norm_output(tiny_model_dirs):
    h = load(tiny_model_dirs["llama"], device="cpu")
    batch = _batch(h.tokenizer)
    seen = {}
    hook = h.adapter.layers[-1].register_forward_hook(lambda m, a, out: seen.setdefault("h", out))
    with torch.no_grad():
        h.model(**batch)
    hook.remove()
    with torch.no_grad():
        part = h.adapter.hidden_after(2, **batch)
    torch.testing.assert_close(part, seen["h"])


def test_truncated_forward_never_runs_blocks_above(tiny_model_dirs, family):
    h = load(tiny_model_dirs[family], device="cpu")
    calls = []
    hooks = [
        h.adapter.layers[2].register_forward_pre_hook(lambda *a: calls.append("block2")),
        h.model.get_output_embeddings().register_forward_pre_hook(lambda *a: calls.append("lm_head")),
    ]
    with torch.no_grad():
        out = h.adapter.hidden_states_at([0, 1], **_batch(h.tokenizer))
    for hk in hooks:
        hk.remove()
    assert calls == []
    assert set(out) == {0, 1} and out[0].shape == out[1].shape
    assert not torch.equal(out[0], out[1])


def test_truncated_forward_accepts_inputs_embeds_with_grad(tiny_model_dirs):
    h = load(tiny_model_dirs["qwen3"], device="cpu")
    batch = _batch(h.tokenizer)
    embeds = h.adapter.embed_tokens(batch["input_ids"]).detach().requires_grad_(True)
    out = h.adapter.hidden_after(1, inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    with torch.no_grad():
        ref = h.adapter.hidden_after(1, **batch)
    torch.testing.assert_close(out, ref)
    out[..., 0].sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0


def test_layer_out_of_range(tiny_model_dirs):
    h = load(tiny_model_dirs["llama"], device="cpu")
    with pytest.raises(ModelError, match=r"blocks 0\.\.2"):
        h.adapter.hidden_after(3, **_batch(h.tokenizer))


def test_model_info_counts(tiny_model_dirs):
    h = load(tiny_model_dirs["llama"], device="cpu")
    info = model_info(h)
    total = sum(p.numel() for p in h.model.parameters())
    assert info["parameters"] == total
    # untied: both the embedding and the LM head are embedding parameters
    assert info["non_embedding_parameters"] == total - 2 * 400 * 64
    assert info["tied_embeddings"] is False
    g = model_info(load(tiny_model_dirs["gemma3"], device="cpu"))
    assert g["tied_embeddings"] is True
    assert g["non_embedding_parameters"] == g["parameters"] - 400 * 64
    text = format_info(info)
    assert "heads / KV heads  4 / 2" in text and "MLP width" in text


def test_unsupported_architecture_lists_supported(tmp_path, chat_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=400)).save_pretrained(tmp_path)
    chat_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=r"unsupported architecture 'gpt2'; supported: Gemma3, Llama, Mistral"):
        load(tmp_path)
    with pytest.raises(ModelError, match="unsupported"):
        ArchAdapter(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=400)))


def test_bad_model_specs(tmp_path, tiny_model_dirs):
    with pytest.raises(ModelError, match="no such model folder"):
        load(str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="no config.json"):
        load(tmp_path)
    with pytest.raises(ModelError, match="no such GGUF file"):
        load(tmp_path / "x.gguf")
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_model_dirs["llama"], no_tok)
    for f in no_tok.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            f.unlink()
    with pytest.raises(ModelError, match="has no tokenizer"):
        load(no_tok)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="broken"):
        load(broken)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="Hub could not provide it"):
        load("some-org/some-model-that-is-not-here")


def test_dtype_option(tiny_model_dirs):
    h = load(tiny_model_dirs["llama"], dtype="bfloat16", device="cpu")
    assert h.model.dtype == torch.bfloat16
    with pytest.raises(ModelError, match="dtype 'int3'"):
        load(tiny_model_dirs["llama"], dtype="int3", device="cpu")


def test_saved_folder_reloads_identically(tiny_model_dirs, tmp_path):
    """The contract every stage relies on: save_pretrained folders reload bit-identically via load()."""
    h = load(tiny_model_dirs["mistral"], device="cpu")
    h.model.save_pretrained(tmp_path)
    h.tokenizer.save_pretrained(tmp_path)
    again = load(tmp_path, device="cpu")
    ids = h.tokenizer(["The patient presented with fever."], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(h.model(**ids).logits, again.model(**ids).logits)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mistral"


def test_auto_dtype_is_bf16_only_where_the_gpu_supports_it(monkeypatch):
    from finescope.modeling import default_dtype

    assert default_dtype("cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert default_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert default_dtype("cuda") == torch.float32  # V100 / T4: not fp16 (overflow, no loss scaler)
