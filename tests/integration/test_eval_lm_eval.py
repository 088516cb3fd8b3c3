"""The shipped lm-eval task YAMLs run offline and lm-eval's scores agree with ours on the same questions."""

from __future__ import annotations

from pathlib import Path

import pytest

import finescope.evaluate
from finescope.evaluate.mc import Request, pick, score_requests
from finescope.evaluate.tasks import (
    LETTERS,
    MMLU_CATEGORIES,
    load_mmlu,
    mmlu_cloze_prompt,
    mmlu_letter_prompt,
    select_subset,
)

TASK_DIR = Path(finescope.evaluate.__file__).parent / "lm_eval_tasks"


def test_lm_eval_agrees_with_our_scorer(tmp_path, chat_tokenizer):
    pytest.importorskip("lm_eval")
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import tiny_config

    # A tiny random Llama with room for whole MMLU prompts: both harnesses truncate long inputs, differently
    # when a question's choices differ in length, so the comparison is made without truncation.
    cfg = tiny_config("llama", len(chat_tokenizer))
    cfg.max_position_embeddings = 4096
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "model")
    chat_tokenizer.save_pretrained(tmp_path / "model")
    model_dir = str(tmp_path / "model")
    docs = [d for d in load_mmlu() if MMLU_CATEGORIES[d["subject"]] == "stem"]
    idx = select_subset(len(docs), 6)
    tasks = ["finescope_mmlu_stem", "finescope_mmlu_stem_cloze"]
    out = simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32",
        tasks=tasks,
        task_manager=TaskManager(include_path=str(TASK_DIR)),
        num_fewshot=0,
        samples={t: idx for t in tasks},
        log_samples=True,
        batch_size=2,
        device="cpu",
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    for task, prompt, norm in (
        ("finescope_mmlu_stem", mmlu_letter_prompt, "none"),
        ("finescope_mmlu_stem_cloze", mmlu_cloze_prompt, "chars"),
    ):
        theirs = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in theirs] == idx
        for i, sample in zip(idx, theirs):
            d = docs[i]
            choices = list(LETTERS) if norm == "none" else d["choices"]
            req = Request(prompt(d, []), [f" {c}" for c in choices])
            assert sample["arguments"][0][0] == req.context  # the same prompt text
            ours = score_requests(model, tok, [req])[0]
            lm_ll = [float(r[0][0]) for r in sample["resps"]]
            assert [s.logprob for s in ours] == pytest.approx(lm_ll, abs=2e-3)
            metric = "acc" if norm == "none" else "acc_norm"
            assert float(pick(ours, choices, norm) == d["answer"]) == sample[metric]
