"""Prompt templates, chosen by name: how a question is asked and what the target answer looks like.

  gsm8k  reasoning, then a final line `#### N` (GSM8K's own format)
  r1     `<think>reasoning</think> <answer>N</answer>` (as in the seed reports; stop at </answer>)
  math   reasoning ending in `\\boxed{answer}` (MATH's own solutions already do)

`answer_only` makes the target only the final answer part (`#### 72`, `<answer>72</answer>`,
`\\boxed{72}`): verl's MultiTurnSFTDataset puts every assistant token in the loss, so a shorter
assistant turn is how "supervise only the answer" is expressed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

CALCULATOR = re.compile(r"<<[^>]*>>")


@dataclass(frozen=True)
class Template:
    name: str
    instruction: str
    stop: tuple[str, ...]

    def prompt(self, question: str) -> str:
        return f"{question.strip()}\n\n{self.instruction}"

    def target(self, reasoning: str, answer: str, answer_only: bool = False) -> str:
        reasoning = reasoning.strip()
        if self.name == "gsm8k":
            final = f"#### {answer}"
            return final if answer_only else f"{reasoning}\n{final}"
        if self.name == "r1":
            final = f"<answer>{answer}</answer>"
            return final if answer_only else f"<think>\n{reasoning}\n</think> {final}"
        final = f"\\boxed{{{answer}}}"
        if answer_only:
            return final
        return reasoning if "\\boxed" in reasoning else f"{reasoning}\nThe answer is ${final}$."


TEMPLATES = {
    "gsm8k": Template("gsm8k", "Solve the problem step by step. Write the final answer as a number "
                      "on its own line, after \"####\".", ()),
    "r1": Template("r1", "Think step by step inside <think> </think> tags, then give only the final "
                   "number inside <answer> </answer> tags.", ("</answer>",)),
    "math": Template("math", "Solve the problem step by step. Put the final answer in \\boxed{}.", ()),
}


def get(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"data.template={name!r}: known templates are {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def split_gsm8k(answer: str, strip_calculator: bool = True) -> tuple[str, str]:
    """GSM8K's 'reasoning\\n#### 72' as (reasoning, '72'); the number is '' when there is none."""
    if strip_calculator:
        answer = CALCULATOR.sub("", answer)
    if "####" not in answer:
        return answer.strip(), ""
    reasoning, final = answer.rsplit("####", 1)
    return reasoning.strip(), final.strip().replace(",", "")
