"""The fixed prompts every evaluation answers, so two checkpoints can be read side by side.

One prompt per Dolly category (the kinds of work the mix teaches), one grade-school math word
problem (the GSM8K skill, with a known answer of 42) and one open question. Each is a record in the
shape ``prepare`` normalises rows to (``instruction``, ``input``, ``category``), so it is rendered
with the same template the model was trained with. Written for this project; none is taken from the
training data.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FixedPrompt:
    name: str
    category: str
    instruction: str
    input: str = ""

    def as_record(self) -> dict:
        return {"instruction": self.instruction, "input": self.input, "category": self.category}


FIXED_PROMPTS: tuple[FixedPrompt, ...] = (
    FixedPrompt(
        name="closed_qa",
        category="closed_qa",
        instruction="According to the passage, in which year did the bridge open to traffic?",
        input=(
            "Construction of the Harbour Bridge began in 1924 and took eight years. After load tests "
            "with 96 steam locomotives, the bridge opened to traffic in March 1932."
        ),
    ),
    FixedPrompt(
        name="open_qa",
        category="open_qa",
        instruction="Why do leaves change colour in autumn?",
    ),
    FixedPrompt(
        name="classification",
        category="classification",
        instruction="Classify each as a fruit or a vegetable: apple, carrot, banana, spinach, mango.",
    ),
    FixedPrompt(
        name="information_extraction",
        category="information_extraction",
        instruction="List every city named in the text, separated by commas.",
        input=(
            "The tour starts in Lisbon, crosses into Spain for two nights in Seville and Granada, "
            "and ends with a flight from Madrid back to Lisbon."
        ),
    ),
    FixedPrompt(
        name="brainstorming",
        category="brainstorming",
        instruction="Give me five ideas for a rainy Sunday afternoon with children.",
    ),
    FixedPrompt(
        name="general_qa",
        category="general_qa",
        instruction="What is the difference between weather and climate?",
    ),
    FixedPrompt(
        name="creative_writing",
        category="creative_writing",
        instruction="Write a four-line poem about a lighthouse keeper.",
    ),
    FixedPrompt(
        name="summarization",
        category="summarization",
        instruction="Summarize the paragraph in one sentence.",
        input=(
            "Honeybees communicate the location of food with a waggle dance. The angle of the dance "
            "relative to vertical tells other bees the direction of the flowers relative to the sun, "
            "and the length of the waggle run tells them how far away the flowers are."
        ),
    ),
    FixedPrompt(
        name="math",
        category="math",
        instruction=(
            "A baker makes 8 trays of 6 muffins. She sells 30 muffins in the morning and bakes 24 more "
            "in the afternoon. How many muffins does she have at the end of the day?"
        ),
    ),
    FixedPrompt(
        name="open_question",
        category="general",
        instruction="What is the capital of France, and what is it famous for?",
    ),
)
