"""Regenerate the shipped sample data sets from templates (deterministic; no outside text).

Run `python -m trainers.sample_data.make_samples` to rewrite `classification.jsonl` (210 support
tickets, 3 classes), `ner.conll` (150 sentences, PER/ORG/LOC in BIO) and `instruction.jsonl`
(100 chat conversations) and `chat_style.jsonl` (120 conversations whose replies are one line of JSON, the
style the quickstart's chat adapter learns). Every name, sentence and answer is made up here.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
SEED = 7

TICKETS = {
    "billing": (
        [
            "I was charged twice for my {plan} plan",
            "my invoice shows the wrong amount",
            "please refund the {plan} subscription fee",
            "why did my card get billed {when}",
            "the payment failed but money left my account",
            "I need a receipt for the {plan} plan",
            "cancel auto renewal before the next charge",
            "update the credit card on my account",
        ],
        ["thanks", "please help", "this is urgent", "", "asap", "kind regards"],
    ),
    "technical": (
        [
            "the app crashes when I open settings",
            "I cannot log in after the update",
            "the page shows an error {code}",
            "sync stopped working {when}",
            "the download keeps freezing at {pct} percent",
            "password reset link does not work",
            "the screen goes blank on my {device}",
            "notifications stopped on my {device}",
        ],
        ["thanks", "please fix", "any idea", "", "it happens every time", "help"],
    ),
    "shipping": (
        [
            "my package has not arrived {when}",
            "the parcel was delivered to the wrong address",
            "tracking number shows no updates",
            "the box arrived damaged",
            "can I change the delivery address for order {code}",
            "the courier never came {when}",
            "my order is stuck in customs",
            "how long does delivery to {city} take",
        ],
        ["thanks", "please check", "where is it", "", "still waiting", "regards"],
    ),
}
FILL = {
    "plan": ["premium", "basic", "family", "yearly", "monthly"],
    "when": ["yesterday", "last week", "this morning", "twice this month", "since monday"],
    "code": ["4012", "500", "A-77", "9931", "X12"],
    "pct": ["40", "75", "99", "10"],
    "device": ["phone", "tablet", "laptop", "watch"],
    "city": ["Oslo", "Lima", "Perth", "Cairo", "Quito"],
}

FIRST = ["Anna", "Omar", "Lena", "Ravi", "Sofia", "Jonas", "Mei", "Tomas", "Aisha", "Pablo"]
LAST = ["Berg", "Haddad", "Kowalski", "Iyer", "Marino", "Lind", "Chen", "Novak", "Bello", "Ruiz"]
ORGS = [
    ["Nordwind", "Labs"],
    ["Blue", "Harbor", "Bank"],
    ["Orbitex"],
    ["Green", "Valley", "Foods"],
    ["Kestrel", "Systems"],
    ["Atlas", "Rail"],
    ["Mosaic", "Press"],
    ["Quanta", "Health"],
]
LOCS = [
    ["Oslo"],
    ["Lima"],
    ["New", "Harbor"],
    ["Cairo"],
    ["Port", "Silva"],
    ["Quito"],
    ["Lake", "Moren"],
    ["Perth"],
    ["Valdez"],
    ["San", "Ardo"],
]
NER_TEMPLATES = [
    "{PER} works for {ORG} in {LOC} .",
    "{PER} visited {LOC} last spring .",
    "{ORG} opened a new office in {LOC} .",
    "yesterday {PER} met {PER} at the {ORG} headquarters .",
    "the mayor of {LOC} praised {ORG} .",
    "{PER} left {ORG} to join {ORG} .",
    "shares of {ORG} rose after the report from {LOC} .",
    "{PER} was born in {LOC} and now lives in {LOC} .",
    "a spokesperson for {ORG} said {PER} will speak on friday .",
    "flights from {LOC} to {LOC} were delayed .",
]

CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Norway": "Oslo",
    "Egypt": "Cairo",
    "Canada": "Ottawa",
    "Chile": "Santiago",
}
WORDS = ["river", "stone", "cloud", "apple", "green", "quiet", "storm", "paper", "light", "music"]


def make_classification(rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for label, (templates, endings) in TICKETS.items():
        for _ in range(70):
            text = rng.choice(templates)
            for key, values in FILL.items():
                text = text.replace("{" + key + "}", rng.choice(values))
            ending = rng.choice(endings)
            rows.append({"text": f"{text} {ending}".strip(), "label": label})
    rng.shuffle(rows)
    return rows


def make_ner(rng: random.Random) -> list[list[tuple[str, str]]]:
    pick = {
        "PER": lambda: [rng.choice(FIRST), rng.choice(LAST)] if rng.random() < 0.7 else [rng.choice(FIRST)],
        "ORG": lambda: rng.choice(ORGS),
        "LOC": lambda: rng.choice(LOCS),
    }
    sentences = []
    for _ in range(150):
        words: list[tuple[str, str]] = []
        for piece in rng.choice(NER_TEMPLATES).split():
            if piece.strip("{}") in pick and piece.startswith("{"):
                kind = piece.strip("{}")
                for index, word in enumerate(pick[kind]()):
                    words.append((word, f"{'B' if index == 0 else 'I'}-{kind}"))
            else:
                words.append((piece, "O"))
        sentences.append(words)
    return sentences


def make_instruction(rng: random.Random) -> list[dict[str, list[dict[str, str]]]]:
    def capital() -> tuple[str, str]:
        country = rng.choice(sorted(CAPITALS))
        return f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."

    def add() -> tuple[str, str]:
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        return f"Add {a} and {b}.", f"{a} + {b} = {a + b}."

    def upper() -> tuple[str, str]:
        text = " ".join(rng.sample(WORDS, 3))
        return f"Write in capital letters: {text}", text.upper()

    def reverse() -> tuple[str, str]:
        words = rng.sample(WORDS, 3)
        return f"Reverse the word order: {' '.join(words)}", " ".join(reversed(words))

    rows = []
    for index in range(100):
        question, answer = rng.choice([capital, add, upper, reverse])()
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if index % 4 == 0:
            messages.insert(0, {"role": "system", "content": "You are a brief, exact assistant."})
        rows.append({"messages": messages})
    return rows


CHAT_CAPITALS = CAPITALS | {
    "Germany": "Berlin",
    "India": "New Delhi",
    "Greece": "Athens",
    "Sweden": "Stockholm",
    "Portugal": "Lisbon",
    "Mexico": "Mexico City",
}  # Italy and Spain stay out: the quickstart asks about them
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "early": "late", "happy": "sad", "light": "dark",
             "open": "closed", "full": "empty", "up": "down", "old": "new"}  # fmt: skip
COLORS = {"the sky on a clear day": "blue", "fresh grass": "green", "snow": "white", "coal": "black",
          "a ripe banana": "yellow", "blood": "red", "a ripe orange": "orange", "milk": "white"}  # fmt: skip


def make_chat_style(rng: random.Random) -> list[dict[str, list[dict[str, str]]]]:
    """Questions of four kinds, every reply one line of JSON with the answer and its topic."""

    def capital() -> tuple[str, str, str]:
        country = rng.choice(sorted(CHAT_CAPITALS))
        return f"What is the capital of {country}?", CHAT_CAPITALS[country], "geography"

    def add() -> tuple[str, str, str]:
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        return f"What is {a} plus {b}?", str(a + b), "math"

    def color() -> tuple[str, str, str]:
        thing = rng.choice(sorted(COLORS))
        return f"What color is {thing}?", COLORS[thing], "nature"

    def opposite() -> tuple[str, str, str]:
        word = rng.choice(sorted(OPPOSITES))
        return f"What is the opposite of {word}?", OPPOSITES[word], "language"

    rows = []
    for _ in range(120):
        question, answer, topic = rng.choice([capital, add, color, opposite])()
        reply = json.dumps({"answer": answer, "topic": topic})
        rows.append(
            {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]}
        )
    return rows


def main() -> None:
    rng = random.Random(SEED)
    with (HERE / "classification.jsonl").open("w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in make_classification(rng))
    with (HERE / "ner.conll").open("w") as handle:
        handle.write("-DOCSTART- O\n\n")
        for sentence in make_ner(rng):
            handle.writelines(f"{word}\t{tag}\n" for word, tag in sentence)
            handle.write("\n")
    with (HERE / "instruction.jsonl").open("w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in make_instruction(rng))
    with (HERE / "chat_style.jsonl").open("w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in make_chat_style(random.Random(SEED)))


if __name__ == "__main__":
    main()
