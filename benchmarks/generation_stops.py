"""Stop sequences in generation: our decoding criterion (`generation._StopOnSequences`) against transformers'
`generate(stop_strings=…, tokenizer=…)` (StopStringCriteria), side by side in one process.

Prints one JSON object. For a tiny random Llama (criterion cost dominates) and the real SmolLM2 (the default
model), 8 prompts × `--new-tokens` new tokens, each variant run `--repeats` times alternately:
- `never`: stop strings that never occur, so every row runs to the limit in both variants (pure per-step cost);
- `tasks`: the benchmark stops (GSM8K and HumanEval) on GSM8K-style, code and chat prompts, where we also check
  that both variants produce identical completions (text, new-token count, cut-off flag);
- `stop_across_prompt_boundary`: a stop string that starts in the prompt and ends in the first generated token.
Also: the median cost of one criterion call on a full batch, and a reference throughput (plain forward of the
same batch, tokens/s). `ratio` = transformers / ours (above 1: ours is faster).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/generation_stops.py                 # ~10 min on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/generation_stops.py --repeats 1 --skip-real
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from typing import cast

import torch

from finescope import generation
from finescope.evaluate.tasks import GSM8K_STOP, HUMANEVAL_STOP
from finescope.modeling import load
from finescope.tokens import encode_prompt, pad_batch, pad_id

NEVER = ["<<never-a-stop>>", "@@@@ ####"]
QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?",
]
CODE = [
    'def add(a, b):\n    """Return the sum of a and b."""\n',
    "from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
    '    """Check if in given list of numbers, are any two numbers closer to each other than given threshold."""\n',
    'def fib(n: int):\n    """Return n-th Fibonacci number.\n    >>> fib(10)\n    55\n    """\n',
]
CHAT = ["What is 12 times 7? Answer briefly.", "Write one sentence about the sea."]


def prompts(tokenizer) -> list[str]:
    gsm = [f"Q: {q}\nA:" for q in QUESTIONS]
    chat = [
        tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
        for c in CHAT
    ]
    return gsm + CODE + chat


def _transformers_batch(model, tokenizer, rows, pad, stop, device, kwargs):
    """`generation._generate_batch` with transformers' StopStringCriteria in place of ours."""
    batch = pad_batch(rows, pad, side="left")
    width = batch["input_ids"].shape[1]
    extra = dict(stop_strings=stop, tokenizer=tokenizer) if stop else {}
    out = model.generate(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), **extra, **kwargs
    )
    return out[:, width:].cpu()


@contextlib.contextmanager
def variant(name: str):
    original = generation._generate_batch
    if name == "transformers":
        generation._generate_batch = _transformers_batch
    try:
        yield
    finally:
        generation._generate_batch = original


def time_generate(model, tok, texts, stop, new_tokens, repeats) -> dict:
    times: dict[str, list[float]] = {"ours": [], "transformers": []}
    outs: dict[str, list] = {}
    for name in ("ours", "transformers"):  # warm-up (transformers caches its stop-string tables)
        with variant(name):
            outs[name] = generation.generate(model, tok, texts, max_new_tokens=new_tokens, stop=stop, batch_size=8)
    for _ in range(repeats):
        for name in ("ours", "transformers"):
            with variant(name):
                t = time.perf_counter()
                generation.generate(model, tok, texts, max_new_tokens=new_tokens, stop=stop, batch_size=8)
                times[name].append(time.perf_counter() - t)
    ours, theirs = statistics.median(times["ours"]), statistics.median(times["transformers"])
    differ = [i for i, (a, b) in enumerate(zip(outs["ours"], outs["transformers"], strict=True)) if a != b]
    return {
        "ours_s": round(ours, 3),
        "transformers_s": round(theirs, 3),
        "ratio": round(theirs / ours, 3),
        "new_tokens": [o[0]["new_tokens"] for o in outs["ours"]],
        "identical_outputs": not differ,
        "differing": [
            {"prompt": i, "ours": outs["ours"][i][0], "transformers": outs["transformers"][i][0]} for i in differ
        ],
    }


def time_criteria(tok, texts, stop, new_tokens, repeats=50) -> dict:
    """Median µs of one call of each criterion on a batch of 8 finished sequences (prompt + new tokens)."""
    from transformers import StopStringCriteria

    torch.manual_seed(0)
    rows = [encode_prompt(tok, t) for t in texts]
    batch = pad_batch(rows, pad_id(tok), side="left")["input_ids"]
    ids = cast(torch.LongTensor, torch.cat([batch, torch.randint(0, len(tok), (batch.shape[0], new_tokens))], dim=1))
    ours = generation._StopOnSequences(tok, batch.shape[1], stop)
    theirs = StopStringCriteria(tok, stop)
    out = {}
    for name, crit in (("ours", ours), ("transformers", theirs)):
        crit(ids, None)
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            crit(ids, None)
            ts.append(time.perf_counter() - t)
        out[f"{name}_us"] = round(statistics.median(ts) * 1e6, 1)
    t = time.perf_counter()
    StopStringCriteria(tok, list(stop) + ["<fresh>"])  # a stop list not seen before: vocabulary tables built anew
    out["transformers_setup_ms"] = round((time.perf_counter() - t) * 1e3, 1)
    return out


def boundary_check(model, tok, texts, new_tokens) -> dict:
    """A stop string that begins in the prompt and ends in the completion: ours looks at the completion only
    (as `cut_at_stop` does afterwards), transformers' criterion at the whole sequence."""
    prompt = texts[0]
    free = generation.generate(model, tok, [prompt], max_new_tokens=new_tokens)[0][0]
    stop = [prompt[-3:] + free["text"][:1]]
    out = {"stop": stop[0]}
    for name in ("ours", "transformers"):
        with variant(name):
            out[name] = generation.generate(model, tok, [prompt], max_new_tokens=new_tokens, stop=stop)[0][0]
    out["identical_outputs"] = out["ours"] == out["transformers"]
    return out


@torch.no_grad()
def forward_throughput(model, tok, texts, new_tokens, repeats) -> float:
    rows = [encode_prompt(tok, t)[:new_tokens] for t in texts]
    rows = [r + [r[-1]] * (new_tokens - len(r)) for r in rows]  # 8 × new_tokens tokens
    ids = torch.tensor(rows)
    model(input_ids=ids)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(input_ids=ids)
        ts.append(time.perf_counter() - t)
    return round(ids.numel() / statistics.median(ts), 1)


def bench(model, tok, new_tokens, repeats) -> dict:
    model.eval()
    texts = prompts(tok)
    task_stop = list(dict.fromkeys(GSM8K_STOP + HUMANEVAL_STOP))
    return {
        "prompts": len(texts),
        "max_new_tokens": new_tokens,
        "forward_tokens_per_s": forward_throughput(model, tok, texts, new_tokens, max(3, repeats)),
        "never": time_generate(model, tok, texts, NEVER, new_tokens, repeats),
        "tasks": time_generate(model, tok, texts, task_stop, new_tokens, repeats),
        "criterion_call": time_criteria(tok, texts, task_stop, new_tokens),
        "stop_across_prompt_boundary": boundary_check(model, tok, texts, 8),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-real", action="store_true", help="only the tiny random model")
    ap.add_argument(
        "--smoke", action="store_true", help="the cheapest mode (the test suite's): --skip-real, 1 repeat, 4 tokens"
    )
    args = ap.parse_args()
    if args.smoke:
        args.skip_real, args.repeats, args.new_tokens = True, 1, 4
    from transformers import LlamaConfig, LlamaForCausalLM

    real = load("default")
    tok = real.tokenizer
    torch.manual_seed(0)
    tiny = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    result = {
        "torch_threads": torch.get_num_threads(),
        "tiny_random_llama": bench(tiny, tok, args.new_tokens, args.repeats * 2),
    }
    if not args.skip_real:
        result["smollm2_135m"] = bench(real.model, tok, args.new_tokens, args.repeats)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
