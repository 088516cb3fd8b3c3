"""The lower layers shared by every stage: finescope.tokens (BOS rule, padding, masked loss) and finescope.hashing
(digests whose values are stored on disk, pinned here to literal known values)."""

from __future__ import annotations

import hashlib
import json
import math
import os

import pytest
import torch

from finescope import data, hashing, storage
from finescope.recover.rewrite import prompt_hash
from finescope.tokens import (
    IGNORE_INDEX,
    encode_continuation,
    encode_prompt,
    next_token_nll,
    pad_batch,
    pad_id,
    pad_rows,
)

# ================================================================================================ padding


def test_right_padding_with_labels():
    b = pad_batch([[5, 6, 7], [8]], 0, labels=[[-100, 6, 7], [8]])
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in b.values())


def test_left_padding_puts_every_last_token_in_the_last_column():
    b = pad_batch([[5, 6, 7], [8], []], 9, side="left")
    assert b["input_ids"].tolist() == [[5, 6, 7], [9, 9, 8], [9, 9, 9]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert "labels" not in b


def test_min_width_and_pad_rows():
    assert pad_batch([[], []], 4, min_width=1)["input_ids"].tolist() == [[4], [4]]
    assert pad_rows([[1, 2], [3]], 0, 4).tolist() == [[1, 2, 0, 0], [3, 0, 0, 0]]
    assert pad_rows([[1, 2], [3]], 7, 3, side="left").tolist() == [[7, 1, 2], [7, 7, 3]]
    with pytest.raises(ValueError, match="side"):
        pad_rows([[1]], 0, 1, side="middle")


class _Tok:
    def __init__(self, pad, eos):
        self.pad_token_id, self.eos_token_id = pad, eos


def test_pad_id_rule():
    assert pad_id(_Tok(3, 2)) == 3
    assert pad_id(_Tok(None, 2)) == 2
    assert pad_id(_Tok(0, 2)) == 0  # id 0 is a real pad id, not "missing"
    assert pad_id(_Tok(None, None)) == 0 and pad_id(_Tok(None, None), fallback=5) == 5


# ================================================================================================ loss


def test_next_token_nll_matches_a_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[IGNORE_INDEX, 1, IGNORE_INDEX, 3], [2, 4, 0, IGNORE_INDEX]])
    loss, n = next_token_nll(logits, labels)
    expected, count = 0.0, 0
    for b in range(2):
        for t in range(1, 4):  # position t is predicted from position t-1
            if labels[b, t] != IGNORE_INDEX:
                logp = logits[b, t - 1] - torch.logsumexp(logits[b, t - 1], 0)
                expected -= float(logp[labels[b, t]])
                count += 1
    assert n == count == 4
    assert math.isclose(float(loss), expected, rel_tol=1e-6)
    assert loss.dtype == torch.float32


def test_next_token_nll_is_token_weighted_across_batches():
    torch.manual_seed(1)
    logits, labels = torch.randn(3, 6, 7), torch.randint(0, 7, (3, 6))
    labels[1, 3:] = IGNORE_INDEX
    whole, n = next_token_nll(logits, labels)
    parts = [next_token_nll(logits[i : i + 1], labels[i : i + 1]) for i in range(3)]
    assert n == sum(k for _, k in parts)
    assert torch.allclose(whole, sum(part for part, _ in parts))


def _saved_bytes(fn, *args, **kwargs):
    """fn(*args, **kwargs) and the bytes autograd saved for its backward pass (activation memory)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    return out, total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_next_token_nll_equals_one_piece_in_value_and_gradient_and_keeps_less(dtype):
    torch.manual_seed(2)
    base = torch.randn(3, 9, 50).to(dtype)
    labels = torch.randint(0, 50, (3, 9))
    labels[0, :4] = IGNORE_INDEX
    labels[2, 6:] = IGNORE_INDEX
    results = {}
    for name, chunk in (("whole", None), ("chunked", 3 * 50)):  # 3 positions per chunk: 6 chunks of the 18
        logits = base.clone().requires_grad_()
        (loss, n), saved = _saved_bytes(next_token_nll, logits, labels, chunk_elements=chunk)
        loss.backward()
        results[name] = (loss.detach(), n, logits.grad, saved)
    (whole, n_whole, g_whole, saved_whole), (chunked, n_chunked, g_chunked, saved_chunked) = results.values()
    assert n_whole == n_chunked == int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(g_chunked.float(), g_whole.float(), atol=1e-5, rtol=1e-4)
    # autograd keeps the labelled rows themselves (in their dtype) and a few index bytes, not a float32 log-softmax:
    # each chunk's is recomputed in the backward pass
    rows = n_whole * base.shape[-1]
    assert saved_chunked <= rows * base.element_size() + 512
    assert saved_whole >= rows * 4 * 2


def test_next_token_nll_above_the_chunk_size_with_nothing_labelled_is_zero():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    loss, n = next_token_nll(logits, torch.full((2, 4), IGNORE_INDEX), chunk_elements=5)
    assert n == 0 and float(loss.detach()) == 0.0


# ================================================================================================ BOS rule


@pytest.fixture(scope="module")
def bos_tokenizer():
    """The tiny test tokenizer, made to add BOS like Llama's."""
    from tokenizers import processors

    from conftest import build_tokenizer

    tok = build_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.bos_token_id)]
    )
    return tok


def test_bos_added_once(bos_tokenizer):
    bos = bos_tokenizer.bos_token_id
    plain = encode_prompt(bos_tokenizer, "Add 2 and 3.")
    assert plain[0] == bos and plain.count(bos) == 1
    assert encode_prompt(bos_tokenizer, "<s>Add 2 and 3.") == plain  # a template that renders BOS: no second one
    assert encode_prompt(bos_tokenizer, "") == [bos]
    plain_ids = bos_tokenizer(" and 5", add_special_tokens=False)["input_ids"]
    assert encode_continuation(bos_tokenizer, " and 5") == plain_ids
    assert encode_continuation(bos_tokenizer, "") == []


def test_no_bos_when_the_tokenizer_adds_none(tiny_tokenizer):
    assert encode_prompt(tiny_tokenizer, "Add 2.") == tiny_tokenizer("Add 2.", add_special_tokens=False)["input_ids"]


def test_calibration_and_finetuning_agree_on_bos(bos_tokenizer):
    from finescope.prune.importance import calibration_batches
    from finescope.recover.finetune import tokenize_pair

    for text in ("Plain text here.", "<s>Text that starts with BOS."):
        batches, _ = calibration_batches(
            bos_tokenizer, [{"id": "a", "text": text}], samples=1, length=64, batch_size=1, seed=0
        )
        ex = tokenize_pair(bos_tokenizer, "", text, 64)
        assert batches[0]["input_ids"][0].tolist() == ex.input_ids == encode_prompt(bos_tokenizer, text)


# ================================================================================================ digests


def test_digests_keep_their_known_values():
    # Values computed before these helpers were shared: stored cache keys, ids and DONE hashes depend on them.
    assert hashing.sha256_hex("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert hashing.sha256_hex(b"abc", 16) == "ba7816bf8f01cfea"
    assert storage.config_hash({"b": 1, "a": "é"}) == "aa58fba8483623be"
    assert storage.config_hash({"a": "é", "b": 1}) == "aa58fba8483623be"
    assert data.content_id({"instruction": "Add 2 and 3.", "response": "5"}) == "6def7500ec9c6895"
    assert data.content_id({"text": "日本語"}) == "c1b8fd40a7304ac4"
    assert prompt_hash("Q: 2+2?\nA:") == "8dad61487a044e91"
    assert hashing.digest_parts("coords", 2, "fp", 15, {"b": [1, 2], "a": None}) == "ad720fc51d80732b"
    assert hashing.digest_parts() == hashing.digest_texts([]) == "e3b0c44298fc1c14"
    assert hashing.digest_texts(["a", "b"]) == "8fb20ef63ced4145"
    assert hashing.digest_texts(["ab"]) == "969caaeb3626c0d5"  # boundaries count
    assert hashing.model_config_hash("HuggingFaceTB/SmolLM2-135M") == "70bae3b6f1a6c4ab"
    assert hashing.model_fingerprint("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_streams_and_files(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc" * 1000)
    want = hashlib.sha256(b"abc" * 1000).hexdigest()
    assert hashing.file_sha256(path) == want
    copied = []
    assert hashing.sha256_stream([b"abc" * 500, b"", b"abc" * 500], copied.append) == want
    assert b"".join(copied) == b"abc" * 1000


def _model_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    return folder


def test_model_config_hash_is_path_independent(tmp_path):
    folder = _model_folder(tmp_path)
    assert hashing.model_config_hash(str(folder)) == "27a14c1083d902f9"
    os.utime(folder / "model.safetensors", ns=(1, 1))
    assert hashing.model_config_hash(str(folder)) == "27a14c1083d902f9"


def test_model_fingerprint_recipe_and_invalidation(tmp_path):
    folder = _model_folder(tmp_path)
    st = (folder / "model.safetensors").stat()
    h = hashlib.sha256()
    for part in (str(folder.resolve()), '{"model_type": "llama"}', [["model.safetensors", 10, st.st_mtime_ns]]):
        h.update(json.dumps(part, sort_keys=True).encode() + b"\0")
    assert hashing.model_fingerprint(str(folder)) == h.hexdigest()[:16]
    os.utime(folder / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert hashing.model_fingerprint(str(folder)) != h.hexdigest()[:16]  # rewritten weights: a new cache key
