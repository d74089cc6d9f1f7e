"""Math problems with verifiable answers, normalized to `{"question": str, "answer": str}`.

- GSM8K (`openai/gsm8k`): `question`, `answer` whose final answer follows `####`.
- MATH (`hendrycks/competition_math`, `EleutherAI/hendrycks_math`): `problem` and a
  `solution` whose last `\\boxed{}` is the answer.
- Anything else with `question` and `answer` (string or number): the final answer alone,
  holding a number (arithmetic, gsm8k graders) or written in LaTeX (math grader).
"""

from __future__ import annotations

import math
import re
from typing import Any

from resources.datasets.graders import gsm8k_reference, last_boxed, last_number
from resources.datasets.sources import DatasetError

GSM8K_CALC = re.compile(r"<<[^<>]*=[^<>]*>>")  # GSM8K's calculator annotations, e.g. <<48/2=24>>


def validate_problem(record: Any, origin: str, where: str) -> dict:
    """`{"question", "answer"}` whose answer the graders can read, so a reference no grader
    can parse is refused here, before any training: a MATH solution needs a non-empty
    `\\boxed{}`, a GSM8K answer a number after `####`, any other answer a number (what the
    arithmetic and gsm8k graders compare) or LaTeX (what the math grader compares)."""

    def fail(field: str, problem: str) -> DatasetError:
        return DatasetError(f"{origin}: {where}: field {field!r}: {problem}")

    if not isinstance(record, dict):
        raise DatasetError(f"{origin}: {where}: expected a JSON object, got {type(record).__name__}")
    if "problem" in record:  # MATH
        question, solution = record["problem"], record.get("solution")
        if not isinstance(solution, str):
            raise fail("solution", "missing or not a string")
        answer = last_boxed(solution)
        if answer is None:
            raise fail("solution", "no \\boxed{} answer (or unbalanced braces)")
        if not answer.strip():
            raise fail("solution", "its last \\boxed{} is empty; the math grader compares what is inside it")
        field = "problem"
    else:
        for name in ("question", "answer"):
            if name not in record:
                raise fail(name, "missing")
        question, answer = record["question"], record["answer"]
        if isinstance(answer, float) and not math.isfinite(answer):
            raise fail("answer", f"expected a finite number, got {answer}")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str):
            raise fail("answer", f"expected a string or number, got {type(answer).__name__}")
        if "####" in answer:  # GSM8K
            answer = gsm8k_reference(answer)
            if not answer:
                raise fail("answer", "nothing after '####'; a GSM8K answer ends with '#### <number>'")
            if last_number(answer) is None:
                raise fail("answer", f"'#### {_short(answer)}' has no number after '####'; the gsm8k grader "
                                     "compares that number (e.g. '#### 72')")
        elif answer.strip():
            _check_plain_answer(answer, fail)
        field = "question"
    if not isinstance(question, str) or not question.strip():
        raise fail(field, "expected a non-empty string")
    if not answer.strip():
        raise fail("answer", "empty")
    return {"question": question, "answer": answer}


def _check_plain_answer(answer: str, fail) -> None:
    """A final answer the graders can compare: a number, or LaTeX for the math grader."""
    latex = "\\" in answer or "$" in answer
    lines = answer.strip().count("\n") + 1
    calc = GSM8K_CALC.search(answer)
    if calc or (lines > 1 and not latex):
        shape = f"with GSM8K calculator notes like {calc.group()}" if calc else f"{lines} lines"
        raise fail("answer", f"a worked solution ({shape}) with no '#### <number>' line; a GSM8K answer ends "
                             "with '#### <number>' (the number the gsm8k grader compares), any other answer is "
                             "the final answer alone")
    if last_number(answer) is None and not latex:
        raise fail("answer", f"{_short(answer)!r} has no number, so the arithmetic and gsm8k graders cannot "
                             "grade it (they compare the answer's last number: write it in digits); a symbolic "
                             "answer for env math is accepted as LaTeX ('$x$', '\\frac{a}{b}')")


def _short(text: str, limit: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
