"""Regenerate the shipped preference samples (deterministic templates; no outside text).

Run `python -m trainers.sample_data.make_preference_samples` to rewrite `preference_pairs.jsonl`
(100 pairs over 20 how-to topics: the chosen answer is polite and on topic, the rejected one rude
or off topic) and `prompts.jsonl` (40 prompts on the same topics, for PPO). Learnable on purpose:
a reward model or DPO run on the tiny base separates them within a few steps.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent

TOPICS = [
    ("bake bread", "mix flour, water, yeast and salt, knead, let it rise, then bake it hot"),
    ("learn to swim", "start in shallow water, practise floating and breathing, then take a class"),
    ("save money", "track what you spend, set a budget and move some savings aside each month"),
    ("sleep better", "keep a regular bedtime, dim the screens and keep the room cool and dark"),
    ("water a cactus", "water it deeply but rarely, and let the soil dry out completely in between"),
    ("tie a tie", "cross the wide end over, loop it up through the neck and pull it through the knot"),
    ("write a cover letter", "name the job, show two results that fit it, and keep it to one page"),
    ("start running", "begin with short easy runs, mix in walking and add a little each week"),
    ("clean a cast iron pan", "rinse it with hot water, scrub, dry it fully and rub in a thin coat of oil"),
    ("learn a language", "practise a little every day, speak early and read things you enjoy"),
    ("brew green tea", "use water just below boiling and steep the leaves for about two minutes"),
    ("fix a flat tire", "remove the wheel, find the hole, patch or replace the tube and pump it up"),
    ("plant tomatoes", "plant them in full sun, water the roots well and give them a stake"),
    ("focus while studying", "put the phone away, work in short blocks and take small breaks"),
    ("make new friends", "join a club or class you like, say hello and follow up with a plan"),
    ("prepare for an interview", "read about the company, practise answers aloud and prepare questions"),
    ("keep a plant alive", "give it the right light, water when the soil is dry and check the leaves"),
    ("cook rice", "rinse the rice, use about twice as much water, simmer covered and let it rest"),
    ("back up my photos", "copy them to an external drive and to a cloud service, and check both"),
    ("calm down before a talk", "breathe slowly, practise the opening and remember the audience is friendly"),
]
ASKS = [
    "How do I {t}?",
    "Can you tell me how to {t}?",
    "What is the best way to {t}?",
    "Any tips to {t}?",
    "I want to {t}. Where do I start?",
]
POLITE = [
    "Sure, happy to help! To {t}, {a}. Good luck!",
    "Great question. To {t}, {a}. I hope this helps!",
    "Of course! The simple way to {t}: {a}. Let me know if you need more.",
    "Thanks for asking. To {t}, {a}. You can do it!",
    "Gladly! To {t}, {a}. Have fun with it.",
]
RUDE = [
    "Ugh, figure it out yourself. Nobody cares how you {t}.",
    "Whatever. I like trains and soup, ask someone else.",
    "That is a stupid question, stop bothering me.",
    "No. Go away, I am busy doing nothing.",
    "Why would I tell you? Bananas are yellow, the end.",
]


def main() -> None:
    """Write both files."""
    pairs, prompts = [], []
    for i, (t, a) in enumerate(TOPICS):
        for j, ask in enumerate(ASKS):
            k = (i + j) % 5
            pairs.append(
                {
                    "prompt": ask.format(t=t),
                    "chosen": POLITE[k].format(t=t, a=a),
                    "rejected": RUDE[(i * 2 + j) % 5].format(t=t),
                }
            )
        prompts.append({"prompt": ASKS[(i + 1) % 5].format(t=t)})
        prompts.append({"prompt": f"Please explain how to {t}."})
    with open(HERE / "preference_pairs.jsonl", "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    with open(HERE / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in prompts)


if __name__ == "__main__":
    main()
