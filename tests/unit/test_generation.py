"""The shared generation loop (finescope.generation) on tiny random models: left-padded batches equal one-by-one
generation, stop tokens and stop sequences end a completion (not cut off), several samples per prompt, the
per-batch callback, and the model's training mode is restored."""

from __future__ import annotations

import pytest
import torch

from conftest import build_model
from finescope.generation import batch_spans, cut_at_stop, generate, is_degenerate, loops_at_end, stop_token_ids

PROMPTS = [
    "What is 12 times 7?",
    "Natalia sold 48 clips in April and half as many in May. How many in all?",
    "Name a primary colour.",
    "Add 2 and 3.",
    "Which is larger, 3 or 5?",
]


def chat_prompts(tok):
    return [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in PROMPTS
    ]


def test_left_padded_batches_match_one_by_one(chat_tokenizer):
    model = build_model("llama", len(chat_tokenizer))
    prompts = chat_prompts(chat_tokenizer)
    one = generate(model, chat_tokenizer, prompts, max_new_tokens=6, batch_size=1)
    many = generate(model, chat_tokenizer, prompts, max_new_tokens=6, batch_size=4)
    assert [r[0]["text"] for r in one] == [r[0]["text"] for r in many]
    assert all(r[0]["cut_off"] and r[0]["new_tokens"] == 6 for r in one)  # a random model never ends its turn


def test_stop_token_ends_generation_and_is_not_cut_off(chat_tokenizer):
    model = build_model("llama", len(chat_tokenizer))
    prompt = chat_prompts(chat_tokenizer)[0]
    first = generate(model, chat_tokenizer, [prompt], max_new_tokens=3)[0][0]
    ids = chat_tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        second_token = int(model.generate(**ids, max_new_tokens=2, do_sample=False)[0, -1])
    model.generation_config.eos_token_id = [second_token]  # the model's 2nd greedy token now ends the turn
    assert second_token in stop_token_ids(model, chat_tokenizer)
    out = generate(model, chat_tokenizer, [prompt], max_new_tokens=3)[0][0]
    assert out["new_tokens"] == 1 and out["cut_off"] is False
    assert first["text"].startswith(out["text"])


def test_stop_sequence_cuts_text_and_stops_that_row_only(tiny_tokenizer):
    model = build_model("qwen2", len(tiny_tokenizer))
    free = generate(model, tiny_tokenizer, PROMPTS[:2], max_new_tokens=12, batch_size=2)
    text = free[0][0]["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]  # two characters from the middle of the free completion
    assert stop.strip(), text
    cut = generate(model, tiny_tokenizer, PROMPTS[:2], max_new_tokens=12, batch_size=2, stop=[stop])
    assert cut[0][0]["text"] == cut_at_stop(text, [stop]) and len(cut[0][0]["text"]) < len(text)
    assert cut[0][0]["cut_off"] is False
    if stop not in free[1][0]["text"]:  # the other row of the batch ran on to the limit
        assert cut[1][0]["text"] == free[1][0]["text"] and cut[1][0]["cut_off"] is True


def test_samples_callback_and_training_mode(tiny_tokenizer):
    model = build_model("llama", len(tiny_tokenizer)).train()
    seen = []
    outs = generate(
        model,
        tiny_tokenizer,
        PROMPTS,
        max_new_tokens=5,
        batch_size=2,
        num_samples=3,
        temperature=1.0,
        seed=3,
        on_batch=lambda idx, comps: seen.append((list(idx), comps)),
    )
    assert [len(o) for o in outs] == [3] * len(PROMPTS)
    assert sorted(i for idx, _ in seen for i in idx) == list(range(len(PROMPTS)))
    assert all(outs[i] == c for idx, comps in seen for i, c in zip(idx, comps))
    assert model.training  # restored after generating in eval mode
    again = generate(
        model, tiny_tokenizer, PROMPTS, max_new_tokens=5, batch_size=2, num_samples=3, temperature=1.0, seed=3
    )
    assert again == outs  # seeded sampling is reproducible
    assert len({c["text"] for o in outs for c in o}) > len(PROMPTS)  # samples differ


def test_skipped_prompts_leave_the_other_batches_as_they_were(tiny_tokenizer):
    """A resumed run skips what it has; the rest is sampled in the batches, with the seeds, of an uninterrupted run."""
    model = build_model("llama", len(tiny_tokenizer))
    kw = dict(max_new_tokens=5, batch_size=2, temperature=1.0, seed=3)
    whole = generate(model, tiny_tokenizer, PROMPTS, **kw)
    seen = []
    skip = {0, 2}
    part = generate(model, tiny_tokenizer, PROMPTS, skip=skip, on_batch=lambda idx, c: seen.extend(idx), **kw)
    assert all(part[i] == [] for i in skip) and sorted(seen) == [i for i in range(len(PROMPTS)) if i not in skip]
    assert [part[i] for i in seen] == [whole[i] for i in seen]


def test_batches_end_early_rather_than_be_half_padding():
    # one 1,330-token prompt heads the longest-first order (as it would among the default's KD records)
    lengths = [1330, 503, 477, 462, 326] + [250] * 40 + [80] * 100
    spans = batch_spans(lengths, 32, 64)
    assert spans[0] == (0, 4)  # a fifth row would make the batch more than half padding
    assert [e - s for s, e in spans[1:]] == [32] * 4 + [13]  # similar lengths: plain batches, the last short
    assert [i for s, e in spans for i in range(s, e)] == list(range(len(lengths)))  # every prompt once, in order
    for s, e in spans:
        assert e - s == 1 or (e - s) * (lengths[s] + 64) <= 2 * sum(n + 64 for n in lengths[s:e])
    assert batch_spans([200, 190, 150, 120, 110, 100, 100, 90], 8, 128) == [(0, 8)]  # GSM8K-like: one batch
    assert batch_spans([5000, 10, 10], 8, 0) == [(0, 2), (2, 3)] and batch_spans([], 8, 16) == []


def test_a_long_outlier_prompt_does_not_pad_the_whole_batch_and_completions_stay_the_same(tiny_tokenizer):
    model = build_model("llama", len(tiny_tokenizer))
    prompts = [" ".join(["word"] * 300) + " " + PROMPTS[0], *PROMPTS[1:]]
    seen = []
    outs = generate(
        model, tiny_tokenizer, prompts, max_new_tokens=4, batch_size=8, on_batch=lambda i, c: seen.append(i)
    )
    assert seen[0] == [0, 1] and sorted(seen[1]) == [2, 3, 4]  # two rows are at most half padding
    alone = [generate(model, tiny_tokenizer, [p], max_new_tokens=4)[0] for p in prompts]
    assert [o[0]["text"] for o in outs] == [a[0]["text"] for a in alone]


def test_a_vllm_engine_gets_whole_batches_up_to_its_chunk_per_call(monkeypatch):
    from finescope import generation, vllm_backend

    monkeypatch.setattr(vllm_backend, "CHUNK", 4)
    spans = [(0, 2), (2, 3), (3, 4), (4, 7), (7, 12)]  # batches of 2, 1, 1, 3 and 5 prompts
    assert generation._groups(spans, engine=True) == [[(0, 2), (2, 3), (3, 4)], [(4, 7)], [(7, 12)]]
    assert generation._groups(spans, engine=False) == [[span] for span in spans]


def test_cut_at_stop():
    assert cut_at_stop("    return a\ndef other():", ["\ndef", "\nclass"]) == "    return a"
    assert cut_at_stop("no stop", ["\n\n"]) == "no stop"
    assert cut_at_stop("a;b|c", ["|", ";"]) == "a"


COUNTING = "1. 1. 2. 3. 4. 5. 6. 7. 8. 9. 10. 11. 12. 13. 14. 15. 16. 18. 19. 20. 21. 22. 23. 24. 25. 26. 28. 29. 30"


@pytest.mark.parametrize(
    "text",
    [
        COUNTING,  # a compact model's reply (session 45): every word differs, so no 4-gram repeats
        "You can use the formula 2000 * 1800 = " + "2000 * 2000 = " * 8 + "2000 *",  # a unit of 3 words
        "Weight = 2 * 4 = 8 pounds\n" + "".join(f"Weight = 2 * {2**i} = {2 ** (i + 1)} pounds\n" for i in range(3, 8)),
        "So 1/100 * 1 / 100 = " * 5 + "So 1/100 * 1 / 10",  # the token cap cut the last number short
        "".join(f"{i}. The answer is: X\n" for i in range(1, 9)),  # a teacher's answer, cut at 64 tokens
    ],
)
def test_loops_at_end_catches_loops_whose_words_differ(text):
    assert loops_at_end(text) and is_degenerate(text)


@pytest.mark.parametrize(
    "text",
    [
        COUNTING + " and so the answer is 30.",  # a loop the text ends after is not a loop at the end
        "Output:\n" + "\n".join(" ".join(str((i * 7 + j * 3) % 9) for j in range(9)) for i in range(8)),  # a grid
        "The total is " + " + ".join(str(n) for n in (5, 9, 2, 14, 3, 8, 1, 7, 6, 4, 11, 2)) + " +",  # cut by the cap
        "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18",
        "1. 2. 3. 4. 5. 6. 7. 8.",  # a short list: under 20 words
        "Day 1: 5 + 3 = 8 apples\nDay 2: 8 + 3 = 11 apples\nDay 3: 11 + 3 = 14 apples",  # three worked steps
        " ".join(f"{n}." for n in range(40, 10, -1)),  # counting down: numbers that shrink
        "",
    ],
)
def test_loops_at_end_leaves_text_that_ends(text):
    assert not loops_at_end(text)


def test_loops_at_end_needs_20_words():
    assert not loops_at_end("step " * 19) and loops_at_end("step " * 20)
    assert loops_at_end("".join(f"Day {d}: {d} apples\n" for d in range(1, 7)))  # six growing repeats of 4 words
