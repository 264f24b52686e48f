"""The DreamBooth benchmark (Ruiz et al. 2023): 30 subjects and their 25 evaluation prompts.

Data: ``data/dreambooth_subjects.json``, transcribed from google/dreambooth's
``dataset/prompts_and_classes.txt``.  Each prompt template holds ``{0}`` for the unique
identifier token and ``{1}`` for the class noun.  Objects (21 subjects) use the object list,
live subjects (9 cats and dogs) the live list: the two differ in prompts 11-20 (scenes vs
outfits).  Every subject is scored with its own list.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

DATA_FILE = Path(__file__).resolve().parent / "data" / "dreambooth_subjects.json"


@dataclass(frozen=True)
class Subject:
    """One DreamBooth subject: folder name, class noun and whether it is a live subject."""

    name: str
    class_noun: str
    live: bool

    @property
    def prompt_list(self) -> str:
        """Name of the prompt list this subject is scored with: "live" or "object"."""
        return "live" if self.live else "object"


@cache
def _benchmark() -> dict:
    return json.loads(DATA_FILE.read_text())


def subjects() -> dict[str, Subject]:
    """All 30 subjects, keyed by folder name, in the dataset's order."""
    return {
        s["name"]: Subject(s["name"], s["class_noun"], s["live"]) for s in _benchmark()["subjects"]
    }


def prompt_templates(prompt_list: str) -> list[str]:
    """The 25 templates of the "object" or "live" list, with ``{0}``/``{1}`` placeholders."""
    return list(_benchmark()["prompts"][prompt_list])


def subject_prompts(subject: Subject, identifier: str) -> list[str]:
    """The subject's 25 generation prompts, e.g. "a qwe dog in the jungle"."""
    return [t.format(identifier, subject.class_noun) for t in prompt_templates(subject.prompt_list)]


def strip_identifier(prompt: str, identifier: str) -> str:
    """Drop the identifier token: "a qwe dog in the jungle" -> "a dog in the jungle"."""
    return re.sub(rf"\s*\b{re.escape(identifier)}\b\s*", " ", prompt).strip()
