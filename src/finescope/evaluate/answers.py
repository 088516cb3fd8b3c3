"""Answer extraction and normalisation for the generative benchmarks: GSM8K final numbers (lm-eval's strict and
flexible extraction) and MATH boxed answers (Hendrycks' normalisation). Generation itself is
`finescope.generation.generate`.

    from finescope.evaluate.answers import extract_gsm8k, gsm8k_target
    strict, flexible = extract_gsm8k("... so she has 18 eggs. The answer is 18.")

The recover stage's answer-consistency filter (recover/filters.py) extracts answers differently on purpose: it
compares an original response with a rewrite of it in any format (marked or bare numbers, fractions, option
letters), while these functions reproduce the benchmarks' published scoring rules.
"""

from __future__ import annotations

import re

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
        return rest[len("\\boxed ") :].split("$")[0].strip()
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
                return rest[open_at + 1 : i]
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
