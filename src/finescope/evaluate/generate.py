"""Batched generation with left padding, stop sequences and answer extraction (GSM8K numbers, MATH boxed answers).

    from finescope.evaluate.generate import generate
    outs = generate(model, tok, ["Q: 2+2?\\nA:"], max_new_tokens=32, stop=["\\n\\n", "Q:"])
    outs[0][0]   # the first (greedy) completion, cut at the first stop sequence

Prompts are sorted by length so each batch pads little; a row stops once a stop sequence appears in its new
text (per-row stopping), the whole batch when every row has stopped or hit `max_new_tokens`.
"""

from __future__ import annotations

import re

import torch

from ..io import progress


def cut_at_stop(text: str, stop: list[str]) -> str:
    """`text` up to (not including) the earliest stop sequence."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


class _StopOnSequences:
    """A per-row stopping criterion: True for a row once its generated text contains a stop sequence."""

    def __init__(self, tokenizer, prompt_len: int, stop: list[str]):
        self.tokenizer, self.prompt_len, self.stop = tokenizer, prompt_len, [s for s in stop if s]
        self.tail = max((len(s) for s in self.stop), default=0) + 16

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_len:]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if not self.stop or new.shape[1] == 0:
            return done
        texts = self.tokenizer.batch_decode(new[:, -self.tail:], skip_special_tokens=False)
        for i, t in enumerate(texts):
            done[i] = any(s in t for s in self.stop)
        return done


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 256,
    stop: list[str] | None = None,
    batch_size: int = 8,
    num_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 0.95,
    seed: int = 0,
    desc: str = "generate",
) -> list[list[str]]:
    """`num_samples` completions per prompt (greedy when temperature is 0), each cut at the first stop sequence."""
    from transformers import StoppingCriteriaList

    stop = list(stop or [])
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[list[str]] = [[] for _ in prompts]
    sample = temperature > 0
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sample, num_return_sequences=num_samples,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if sample:
        gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    bar = progress(total=len(prompts), desc=desc, unit="prompt")
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                            add_special_tokens=not _starts_with_bos(tokenizer, prompts[idx[0]]))
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            prompt_len = enc["input_ids"].shape[1]
            if sample:
                torch.manual_seed(seed + start)
            out = model.generate(**enc, **gen_kwargs,
                                 stopping_criteria=StoppingCriteriaList([_StopOnSequences(tokenizer, prompt_len, stop)]))
            texts = tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
            for k, text in enumerate(texts):
                results[idx[k // num_samples]].append(cut_at_stop(text, stop))
            bar.update(len(idx))
    finally:
        tokenizer.padding_side = old_side
        bar.close()
    return results


def _starts_with_bos(tokenizer, text: str) -> bool:
    return bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)


# ================================================================================================ GSM8K answers

_NUMBER = re.compile(r"-?[$0-9.,]{2,}|-?[0-9]+")


def normalise_number(s: str) -> str:
    """'$1,234.50' → '1234.5'; '18.' → '18'; non-numbers unchanged (stripped)."""
    s = s.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(s)
    except ValueError:
        return s
    if value.is_integer():
        return str(int(value))
    return repr(value)


def gsm8k_target(answer: str) -> str:
    """The reference number after '####' in a GSM8K answer."""
    return normalise_number(answer.split("####")[-1])


def extract_gsm8k(completion: str) -> tuple[str | None, str | None]:
    """(strict, flexible) answers: strict = the number after 'The answer is' (CoT format) or '####';
    flexible = the last number in the completion (lm-eval's flexible-extract)."""
    strict = None
    m = re.search(r"The answer is \$?(-?[0-9.,]+)", completion) or re.search(r"####\s*\$?(-?[0-9.,]+)", completion)
    if m:
        strict = normalise_number(m.group(1))
    nums = [n for n in _NUMBER.findall(completion) if any(ch.isdigit() for ch in n)]
    flexible = normalise_number(nums[-1]) if nums else None
    return strict, flexible


# ================================================================================================ MATH answers


def last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} (or \\fbox{...}) in `text`, braces balanced; `\\boxed 5` also accepted."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    rest = text[idx:]
    if rest.startswith("\\boxed ") and "{" not in rest.split(" ", 1)[1][:1]:
        return rest[len("\\boxed "):].split("$")[0].strip()
    open_at = rest.find("{")
    if open_at < 0:
        return None
    depth = 0
    for i in range(open_at, len(rest)):
        if rest[i] == "{":
            depth += 1
        elif rest[i] == "}":
            depth -= 1
            if depth == 0:
                return rest[open_at + 1:i]
    return None


def extract_math_answer(completion: str) -> str | None:
    """The model's final answer: the last boxed expression, else Minerva's 'The final answer is X'."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    m = re.search(r"final answer is\s*\$?(.+?)\$?(?:\.\s|\.$|$|\n)", completion, re.IGNORECASE)
    m = m or re.search(r"final answer:\s*\$?(.+?)\$?(?:\.\s|\.$|$|\n)", completion, re.IGNORECASE)
    return m.group(1).strip() if m else None


def _fix_fracs(s: str) -> str:
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{") or len(part) < 2:
            out += part
            continue
        a, b, rest = part[0], part[1], part[2:]
        if b == "{":
            out += "{" + a + "}" + b + rest
        else:
            out += "{" + a + "}{" + b + "}" + rest
    return out


def _fix_a_slash_b(s: str) -> str:
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}" if m else s


def _fix_sqrt(s: str) -> str:
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)


def normalise_math_answer(s: str | None) -> str | None:
    """Hendrycks et al.'s MATH normalisation (strip_string): spacing, \\left/\\right, units, dollars, degrees,
    dfrac/tfrac, a/b → \\frac{a}{b}, \\frac12 → \\frac{1}{2}, leading 0 of decimals, 'x = 3' → '3'."""
    if s is None:
        return None
    s = s.strip().replace("\n", "").rstrip(".")
    s = s.replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\text\{\s*[a-zA-Z ]*\}$", "", s).strip()  # trailing units
    s = re.sub(r"\\(?:text|mbox|mathrm)\{(.*?)\}", r"\1", s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    if "=" in s and len(s.split("=")[0].strip()) <= 2:
        s = s.split("=", 1)[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    s = _fix_a_slash_b(s)
    s = normalise_number(s) if re.fullmatch(r"-?[0-9,]*\.?[0-9]+", s) else s
    return s


def math_equal(pred: str | None, ref: str | None) -> bool:
    """Equality after normalisation (and numerically, when both sides are plain numbers)."""
    a, b = normalise_math_answer(pred), normalise_math_answer(ref)
    if a is None or b is None:
        return False
    if a == b:
        return True
    try:
        return abs(float(a) - float(b)) < 1e-9
    except ValueError:
        return False
