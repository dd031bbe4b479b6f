"""Small data sets shipped inside the package (made up from templates by `make_samples.py`).

`sample_path("classification" | "ner" | "instruction" | ...)` gives the file, so the quickstart and the
tests can train without any download: 210 support tickets in 3 classes (JSONL), 150 sentences with
PER/ORG/LOC in BIO (CoNLL), 100 chat conversations (JSONL), 120 conversations answered in one line
of JSON (`chat-style`); and, for the preference recipes,
preference pairs (reward, dpo) and prompts (ppo).
"""

from __future__ import annotations

from pathlib import Path

SAMPLES = {
    "classification": "classification.jsonl",
    "ner": "ner.conll",
    "instruction": "instruction.jsonl",
    "chat-style": "chat_style.jsonl",  # replies as one line of JSON: the quickstart's chat adapter
    # written by the preference recipes' author (see docs/preference.md)
    "reward": "preference_pairs.jsonl",
    "dpo": "preference_pairs.jsonl",
    "ppo": "prompts.jsonl",
}


def sample_path(task: str) -> Path:
    """The shipped sample file for `task`."""
    if task not in SAMPLES:
        raise KeyError(f"no sample data for {task!r}; samples exist for {', '.join(SAMPLES)}")
    return Path(__file__).with_name(SAMPLES[task])
