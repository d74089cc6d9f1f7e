"""Math problems with verifiable answers, normalized to `{"question": str, "answer": str}`.

- GSM8K (`openai/gsm8k`): `question`, `answer` whose final answer follows `####`.
- MATH (`hendrycks/competition_math`, `EleutherAI/hendrycks_math`): `problem` and a
  `solution` whose last `\\boxed{}` is the answer.
- Anything else with `question` and `answer` (string or number).
"""

from __future__ import annotations

import math
from typing import Any

from resources.datasets.graders import gsm8k_reference, last_boxed
from resources.datasets.sources import DatasetError


def validate_problem(record: Any, origin: str, where: str) -> dict:
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
        field = "question"
    if not isinstance(question, str) or not question.strip():
        raise fail(field, "expected a non-empty string")
    if not answer.strip():
        raise fail("answer", "empty")
    return {"question": question, "answer": answer}
