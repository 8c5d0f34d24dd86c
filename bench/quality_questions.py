"""The fixed question set of ``bench.quality``: everyday questions a new user would ask, each with its expected fact.

A question is answered correctly when its text contains one of ``answers`` as a whole
word or phrase (case-insensitive; ``"7"`` does not match ``"17"``), or, for questions
whose fact is not one word, when ``pattern`` (a regex, case-insensitive, ``.`` spans
lines) matches. Keep the set stable: figures are only comparable over the same set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Question:
    text: str
    answers: tuple[str, ...] = ()
    pattern: str = ""

    def is_answered_by(self, reply: str) -> bool:
        if self.pattern:
            return re.search(self.pattern, reply, re.IGNORECASE | re.DOTALL) is not None
        return any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", reply, re.IGNORECASE) for a in self.answers)


QUESTIONS: tuple[Question, ...] = (
    # Capitals (the README's first example comes first)
    Question("What is the capital of France?", ("Paris",)),
    Question("What is the capital of Japan?", ("Tokyo",)),
    Question("What is the capital of Italy?", ("Rome",)),
    Question("What is the capital of Germany?", ("Berlin",)),
    Question("What is the capital of Spain?", ("Madrid",)),
    Question("What is the capital of Canada?", ("Ottawa",)),
    Question("What is the capital of Egypt?", ("Cairo",)),
    # Simple science
    Question("At what temperature does water boil at sea level, in degrees Celsius?", pattern=r"(?<!\d)100(?!\d)"),
    Question("What is the chemical formula of water?", ("H2O", "H₂O")),
    Question("Which planet is closest to the Sun?", ("Mercury",)),
    Question("What is the largest planet in our solar system?", ("Jupiter",)),
    Question("Which planet is known as the Red Planet?", ("Mars",)),
    Question("What gas do plants absorb from the air for photosynthesis?", ("carbon dioxide", "CO2", "CO₂")),
    Question("How many legs does a spider have?", ("8", "eight")),
    # Arithmetic
    Question("What is 7 times 8?", ("56", "fifty-six")),
    Question("What is 15 plus 27?", ("42", "forty-two")),
    Question("What is 100 minus 37?", ("63", "sixty-three")),
    Question("What is 12 divided by 4?", ("3", "three")),
    Question("What is 9 squared?", ("81", "eighty-one")),
    # Common knowledge
    Question("How many days are there in a week?", ("7", "seven")),
    Question("Who wrote Romeo and Juliet?", ("Shakespeare",)),
    Question("What is the tallest mountain in the world?", ("Everest",)),
    Question("What is the largest ocean on Earth?", ("Pacific",)),
    Question("Who was the first president of the United States?", ("Washington",)),
    Question("How many hours are there in a day?", ("24", "twenty-four")),
    Question("What is the currency of Japan?", ("yen",)),
    Question("What language is mainly spoken in Brazil?", ("Portuguese",)),
    # Definitions
    Question("What does a thermometer measure?", ("temperature",)),
    Question("What is a noun?", pattern=r"\b(person|people|place|thing|object)s?\b"),
    Question("What is gravity?", pattern=r"\b(force|pull|pulls|attract\w*)\b"),
    Question("What is photosynthesis?", pattern=r"(?=.*\b(sun)?light\b)(?=.*\b(energy|food|sugars?|glucose)\b)"),
    # A short how-to
    Question("How do I boil an egg?", pattern=r"(?=.*\bwater\b)(?=.*\bminutes?\b)"),
)
