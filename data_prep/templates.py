"""Prompt templates, chosen by name: how a question is asked and what the SFT target looks like.

  gsm8k  reasoning, then a final line `#### 72` (GSM8K's own format)
  r1     `<think>reasoning</think> <answer>72</answer>` (as in the R1 reports); generation stops at `</answer>`
  math   reasoning ending in `\\boxed{answer}` (MATH's own solutions already do)

`answer_only` makes the assistant target only the final answer part (`#### 72`, `<answer>72</answer>`,
`\\boxed{72}`). verl's MultiTurnSFTDataset puts every assistant token (plus the end-of-turn tokens)
in the loss and nothing else, so a shorter assistant turn is how "supervise only the answer" is
expressed; the prompt still asks for reasoning.

The gold answer is read here too, with the plainest rule for each dataset (data_prep does not import
rewards: data flows data_prep → stages → rewards): GSM8K, the text after the last `####`, commas
removed; MATH, the content of the last `\\boxed{}` with nested braces.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from rewards.math import extract_answer as last_boxed  # rewards/ holds the repo's one answer parser

CALCULATOR = re.compile(r"<<[^<>]*>>")
# two MATH train solutions write `\boxed 2`: a bare token, no braces
BOXED_BARE = re.compile(r"\\boxed ([^\s${}]+)")


@dataclass(frozen=True)
class Template:
    name: str
    instruction: str
    stop: tuple[str, ...]

    def prompt(self, question: str) -> str:
        return f"{question.strip()}\n\n{self.instruction}"

    def final(self, answer: str) -> str:
        """The final-answer part alone: the whole target when answer_only."""
        return {"gsm8k": f"#### {answer}", "r1": f"<answer>{answer}</answer>"}.get(self.name, f"\\boxed{{{answer}}}")

    def target(self, reasoning: str, answer: str, answer_only: bool = False) -> str:
        if answer_only:
            return self.final(answer)
        reasoning = reasoning.strip()
        if self.name == "gsm8k":
            return f"{reasoning}\n{self.final(answer)}"
        if self.name == "r1":
            return f"<think>{reasoning}</think> {self.final(answer)}"
        return reasoning if last_boxed(reasoning) else f"{reasoning}\nThe answer is ${self.final(answer)}$."


TEMPLATES = {
    "gsm8k": Template("gsm8k", "Solve the problem step by step. Write the final answer as a number "
                      "on its own line, after \"####\".", ()),
    "r1": Template("r1", "Think step by step inside <think> </think> tags, then give only the final "
                   "answer inside <answer> </answer> tags.", ("</answer>",)),
    "math": Template("math", "Solve the problem step by step. Put the final answer in \\boxed{}.", ()),
}


def get(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"data.template={name!r}: known templates are {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def split_gsm8k(solution: str, strip_calculator: bool = True) -> tuple[str, str]:
    """GSM8K's 'reasoning\\n#### 1,000' as ('reasoning', '1000'); the answer is '' without '####'.

    >>> split_gsm8k("48/2 = <<48/2=24>>24\\n#### 1,024")
    ('48/2 = 24', '1024')
    """
    if strip_calculator:
        solution = CALCULATOR.sub("", solution)
    if "####" not in solution:
        return solution.strip(), ""
    reasoning, final = solution.rsplit("####", 1)
    return reasoning.strip(), final.strip().replace(",", "")


def brace_bare_boxed(solution: str) -> str:
    """`\\boxed 2` → `\\boxed{2}`, so that targets carry the form graders read."""
    return BOXED_BARE.sub(r"\\boxed{\1}", solution)
