"""Synthetic GSM8K-shaped word problems, generated locally (``synthetic:word_problems``).

A problem is a short story with one question; its answer is a worked solution in GSM8K's form, one
equation per step and the result after ``####``::

    "Tom has 3 boxes of 4 apples. He eats 2. How many apples are left?"
    -> "3 * 4 = 12 apples. 12 - 2 = 10. #### 10"

so the ``final_number`` reward scores it as it scores GSM8K. Numbers stay small (operands below 31,
results below 82) and the wording comes from a few templates, so a tiny model could plausibly learn it.
Departures from GSM8K: no ``<<3*4=12>>`` calculator annotations, and one question shape per template.

The problem space is enumerated (template, person, item, operands), so the task plugs into
:mod:`rlhf_ds.data.tasks` like the arithmetic ones: an index names one problem, and the train /
held-out partition is the same hash of (index, seed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from rlhf_ds.data.records import PromptRecord

# (name, subject pronoun capitalised, the same in lower case)
PEOPLE = (("Tom", "He", "he"), ("Sara", "She", "she"), ("Ben", "He", "he"), ("Mia", "She", "she"),
          ("Sam", "He", "he"), ("Lily", "She", "she"))
ITEMS = ("apples", "eggs", "cookies", "candies", "oranges", "pears")


@dataclass(frozen=True)
class Template:
    """One problem shape. ``prompt`` and ``solution`` are ``str.format`` strings over ``name``, ``He``,
    ``he``, ``item``, the operands ``a``, ``b``, ``c`` and the values ``steps(a, b, c)`` returns (the
    final one under the key ``answer``)."""

    prompt: str
    solution: str
    ranges: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # inclusive bounds of a, b, c
    steps: Callable[[int, int, int], dict[str, int]]

    @property
    def num_operands(self) -> int:
        return math.prod(hi - lo + 1 for lo, hi in self.ranges)

    def operands(self, index: int) -> tuple[int, int, int]:
        """The operands with index ``index`` in [0, num_operands), ``c`` varying fastest."""
        values = []
        for lo, hi in reversed(self.ranges):
            index, offset = divmod(index, hi - lo + 1)
            values.append(lo + offset)
        a, b, c = reversed(values)
        return a, b, c


# c is unused (fixed at 0) by the one-step templates.
TEMPLATES = (
    Template("{name} has {a} {item}. {He} buys {b} more. How many {item} does {he} have now?",
             "{a} + {b} = {answer}. #### {answer}",
             ((2, 20), (2, 20), (0, 0)), lambda a, b, c: {"answer": a + b}),
    Template("{name} has {a} {item}. {He} gives {b} to a friend. How many {item} are left?",
             "{a} - {b} = {answer}. #### {answer}",
             ((10, 30), (1, 9), (0, 0)), lambda a, b, c: {"answer": a - b}),
    Template("{name} has {a} bags with {b} {item} in each bag. How many {item} does {he} have?",
             "{a} * {b} = {answer}. #### {answer}",
             ((2, 9), (2, 9), (0, 0)), lambda a, b, c: {"answer": a * b}),
    Template("{name} has {a} boxes of {b} {item}. {He} eats {c}. How many {item} are left?",
             "{a} * {b} = {total} {item}. {total} - {c} = {answer}. #### {answer}",
             ((3, 9), (3, 9), (1, 8)), lambda a, b, c: {"total": a * b, "answer": a * b - c}),
    Template("{name} has {a} {item}. {He} buys {b} more and eats {c}. How many {item} are left?",
             "{a} + {b} = {total}. {total} - {c} = {answer}. #### {answer}",
             ((2, 15), (2, 15), (1, 3)), lambda a, b, c: {"total": a + b, "answer": a + b - c}),
)


@dataclass(frozen=True)
class WordProblemTask:
    """Every (template, person, item, operands) combination, indexed template by template."""

    name: str
    templates: tuple[Template, ...] = TEMPLATES
    people: tuple[tuple[str, str, str], ...] = PEOPLE
    items: tuple[str, ...] = ITEMS

    def _template_size(self, template: Template) -> int:
        return len(self.people) * len(self.items) * template.num_operands

    @property
    def size(self) -> int:
        """Number of distinct problems."""
        return sum(self._template_size(t) for t in self.templates)

    def texts(self, template_index: int, person: int, item: int, operands: tuple[int, int, int]) -> tuple[str, str]:
        """(prompt, worked solution) of one combination."""
        template = self.templates[template_index]
        name, he_upper, he_lower = self.people[person]
        fields = {"name": name, "He": he_upper, "he": he_lower, "item": self.items[item],
                  "a": operands[0], "b": operands[1], "c": operands[2], **template.steps(*operands)}
        return template.prompt.format(**fields), template.solution.format(**fields)

    def _locate(self, index: int) -> tuple[int, int]:
        """(template index, index among that template's problems) of the problem ``index``."""
        rest = index
        if rest >= 0:
            for template_index, template in enumerate(self.templates):
                if rest < self._template_size(template):
                    return template_index, rest
                rest -= self._template_size(template)
        raise IndexError(f"problem index {index} outside [0, {self.size}) of task {self.name!r}")

    def record(self, index: int) -> PromptRecord:
        """The problem with index ``index`` in [0, size)."""
        template_index, rest = self._locate(index)
        template = self.templates[template_index]
        rest, operands = divmod(rest, template.num_operands)
        person, item = divmod(rest, len(self.items))
        prompt, answer = self.texts(template_index, person, item, template.operands(operands))
        return PromptRecord(prompt=prompt, answer=answer,
                            meta={"task": self.name, "index": index, "template": template_index})

    def tokenizer_corpus(self) -> list[str]:
        """Text a tokenizer for this task is trained on: every (template, person, item) with the template's
        smallest operands, prompt and solution. Small and fixed, so a tokenizer trained on it is the same
        on every build; the digits and symbols of larger operands are byte-level tokens anyway."""
        return [text for t, template in enumerate(self.templates)
                for person in range(len(self.people)) for item in range(len(self.items))
                for text in self.texts(t, person, item, template.operands(0))]


WORD_PROBLEMS = WordProblemTask("word_problems")
