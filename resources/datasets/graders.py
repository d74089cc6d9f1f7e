"""Answer extraction and grading, one grader per task kind, each
`(completion, reference) -> (correct, formatted)` where formatted means an answer could be
extracted at all (RL's format reward).

- conversation: a chat's reference is its last assistant message; correct when the
  completion's last integer equals the reference's (or, with no number in the reference,
  when the reference text appears in the completion).
- arithmetic: the last integer of the answer (commas in numbers allowed).
- gsm8k: the reference is the text after `####`; the answer's last number is compared.
- math (hendrycks MATH): the last `\\boxed{...}` (brace-matched) of each side, compared by
  math-verify, then by sympy on a LaTeX-to-expression rewrite, each under a time limit,
  then as normalized strings.
"""

from __future__ import annotations

import re
import signal
import threading
from contextlib import contextmanager
from typing import Literal

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
INTEGER = re.compile(r"-?\d+")
TIME_LIMIT_S = 2


def last_number(text: str) -> str | None:
    found = NUMBER.findall(text)
    return found[-1].replace(",", "").rstrip(".") if found else None


def gsm8k_reference(solution: str) -> str:
    return solution.split("####")[-1].strip().replace(",", "")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces matched, nesting allowed."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
        i += 1
    return None  # unbalanced


def _normalize(latex: str) -> str:
    s = latex.strip().strip("$").replace("\\!", "").replace("\\,", "").replace("\\ ", "")
    s = re.sub(r"\\(left|right|displaystyle)", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("^\\circ", "").replace("^{\\circ}", "")
    s = re.sub(r"\\text\{\s*[a-zA-Z ]*\}", "", s)
    s = s.replace(" ", "").rstrip(".")
    return re.sub(r"(\d),(\d{3})", r"\1\2", s)


def _to_sympy_source(s: str) -> str:
    """A small LaTeX subset (fractions, roots, powers, pi, products) to Python syntax."""
    for _ in range(5):  # innermost first, so nested fractions unwind
        s = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        s = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", s)
    s = re.sub(r"\\frac(\d)(\d)", r"(\1/\2)", s)
    s = re.sub(r"\\sqrt(\d+)", r"sqrt(\1)", s)
    s = s.replace("\\pi", "pi").replace("\\cdot", "*").replace("\\times", "*").replace("^", "**")
    return s.replace("{", "(").replace("}", ")")


@contextmanager
def _time_limit(seconds: int):
    """SIGALRM on the main thread; elsewhere no limit can be imposed safely, so none is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(*_):
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _math_verify(answer: str, reference: str) -> bool | None:
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    try:
        with _time_limit(TIME_LIMIT_S):
            gold, pred = parse(f"${reference}$"), parse(f"${answer}$")
            return bool(gold and pred and verify(gold, pred))
    except Exception:  # a parser failure or the time limit: fall through to sympy
        return None


def _sympy_equal(answer: str, reference: str) -> bool | None:
    import sympy

    try:
        with _time_limit(TIME_LIMIT_S):
            a, b = (sympy.sympify(_to_sympy_source(x), rational=True) for x in (answer, reference))
            return bool(sympy.simplify(a - b) == 0)
    except Exception:
        return None


def math_equal(answer: str, reference: str) -> bool:
    a, b = _normalize(answer), _normalize(reference)
    if a == b:
        return True
    for judge in (_math_verify, _sympy_equal):
        verdict = judge(a, b)
        if verdict:
            return True
    return False


def grade_conversation(completion: str, reference: str) -> tuple[bool, bool]:
    ref_nums = INTEGER.findall(reference)
    if not ref_nums:
        return reference.strip() in completion, True
    got_nums = INTEGER.findall(completion)
    return bool(got_nums) and got_nums[-1] == ref_nums[-1], bool(got_nums)


def _grade_number(completion: str, want: str | None) -> tuple[bool, bool]:
    got = last_number(completion)
    return (got is not None and want is not None and float(got) == float(want)), got is not None


def grade_arithmetic(completion: str, reference: str) -> tuple[bool, bool]:
    return _grade_number(completion, last_number(reference))


def grade_gsm8k(completion: str, reference: str) -> tuple[bool, bool]:
    return _grade_number(completion, last_number(gsm8k_reference(reference)))


def grade_math(completion: str, reference: str) -> tuple[bool, bool]:
    boxed = last_boxed(completion)
    return (boxed is not None and math_equal(boxed, reference)), boxed is not None


GRADERS = {"conversation": grade_conversation, "arithmetic": grade_arithmetic, "gsm8k": grade_gsm8k, "math": grade_math}
# what a problem set's `env` may name (a conversation's reference is graded by grade_conversation)
ENVS = ("arithmetic", "gsm8k", "math")
Env = Literal["arithmetic", "gsm8k", "math"]


def grade(env: str, completion: str, reference: str) -> tuple[bool, bool]:
    return GRADERS[env](completion, reference)
