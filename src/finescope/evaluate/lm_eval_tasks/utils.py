r"""Data loaders for the shipped lm-evaluation-harness tasks (read from FineScope's packaged, offline data).

    lm_eval --model hf --model_args pretrained=<model dir> \
        --include_path $(python -c "import finescope.evaluate, os; print(os.path.dirname(finescope.evaluate.__file__))")/lm_eval_tasks \
        --tasks finescope_mmlu_stem,finescope_gsm8k_cot --limit 20

The loaders need `finescope` importable in lm-eval's environment (the data come from `finescope.assets`).
"""

from __future__ import annotations


def _dataset(rows: list[dict]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_mmlu(group: str = "all", **_):
    """MMLU test questions of one category (stem, humanities, social_sciences, other) or all, in file order."""
    from finescope.evaluate.tasks import MMLU_CATEGORIES
    from finescope.evaluate.tasks import load_mmlu as _load

    docs = [d for d in _load() if group == "all" or MMLU_CATEGORIES[d["subject"]] == group]
    return _dataset(
        [
            {"question": d["question"], "choices": d["choices"], "answer": d["answer"], "subject": d["subject"]}
            for d in docs
        ]
    )


def load_gsm8k(**_):
    from finescope.evaluate.tasks import load_gsm8k as _load

    return _dataset([{"question": d["question"], "answer": d["answer"]} for d in _load()])


def gsm8k_cot_exemplars():
    """The 8 chain-of-thought exemplars of Wei et al. (2022), the same as `finescope eval`'s gsm8k prompt."""
    from finescope.evaluate.tasks import GSM8K_COT_EXEMPLARS

    return [{"question": q, "target": a} for q, a in GSM8K_COT_EXEMPLARS]
