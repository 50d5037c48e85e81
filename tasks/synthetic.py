"""The embedded default data: general conversations from several task families, and one domain family.

The domain (dosing of invented drugs) shares no answers with the general families, so a model trained on
domain data alone drifts away from them: general validation loss rises, which is what the schedule's
mixing is there to prevent, and what the default run makes visible in MLflow.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

GENERATOR_VERSION = 1

WORDS = (
    "apple river stone cloud garden window silver candle forest bridge rabbit orange paper winter "
    "summer mirror pencil castle dragon meadow harbor lantern marble pillow rocket saddle tiger violin "
    "wagon yellow basket butter copper doctor engine falcon ginger hammer island jacket kettle ladder "
    "magnet needle ocean parrot quiet ribbon spider tunnel velvet whistle"
).split()
CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Egypt": "Cairo",
    "Canada": "Ottawa",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Norway": "Oslo",
    "Greece": "Athens",
    "Chile": "Santiago",
    "Poland": "Warsaw",
    "Cuba": "Havana",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Portugal": "Lisbon",
    "Sweden": "Stockholm",
    "Hungary": "Budapest",
    "Nepal": "Kathmandu",
    "Ghana": "Accra",
}
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "light": "dark",
    "early": "late",
    "full": "empty",
    "hard": "soft",
    "high": "low",
    "old": "new",
    "open": "closed",
    "rich": "poor",
    "wet": "dry",
}
# Invented drugs: mg per kg of body weight, hours between doses, and what each treats.
DRUGS = {
    "valmorex": (2, 8, "migraine"),
    "cindrapine": (5, 12, "high blood pressure"),
    "lotrafen": (10, 6, "joint pain"),
    "mirabucil": (3, 24, "asthma"),
    "dexolan": (4, 8, "fever"),
    "quetrasol": (1, 12, "insomnia"),
    "brenzocaine": (6, 6, "toothache"),
    "fumaxitol": (8, 24, "acid reflux"),
    "selvotran": (7, 12, "nausea"),
    "orbifenac": (9, 8, "back pain"),
    "tazoplin": (2, 24, "allergies"),
    "nuvidrel": (3, 6, "cough"),
    "pramoxil": (5, 8, "ear infection"),
    "kentravir": (4, 12, "cold sores"),
    "zolpharin": (6, 24, "anxiety"),
    "heptazone": (1, 8, "skin rash"),
}
SYSTEM_PROMPT = "You are a helpful assistant."


def general_pair(rng: random.Random) -> tuple[str, str]:
    family = rng.randrange(6)
    if family == 0:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if family == 1:
        word = rng.choice(WORDS)
        return f"Reverse the word {word}.", f"The word {word} reversed is {word[::-1]}."
    if family == 2:
        country = rng.choice(sorted(CAPITALS))
        return f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."
    if family == 3:
        a, b = rng.sample(range(1, 1000), 2)
        return f"Which is larger, {a} or {b}?", f"{max(a, b)} is larger than {min(a, b)}."
    if family == 4:
        word = rng.choice(sorted(OPPOSITES))
        return f"What is the opposite of {word}?", f"The opposite of {word} is {OPPOSITES[word]}."
    word = rng.choice(WORDS)
    return f"How many letters are in {word}?", f"The word {word} has {len(word)} letters."


def domain_record(rng: random.Random) -> dict[str, str]:
    drug = rng.choice(sorted(DRUGS))
    per_kg, hours, condition = DRUGS[drug]
    if rng.random() < 0.3:
        return {
            "instruction": f"What is {drug} used for?",
            "input": "",
            "output": f"{drug.capitalize()} is used to treat {condition}.",
        }
    weight = rng.randint(40, 120)
    return {
        "instruction": f"Give the dose of {drug} for this patient.",
        "input": f"Weight: {weight} kg.",
        "output": f"Give {per_kg * weight} mg of {drug} every {hours} hours.",
    }


def general_record(rng: random.Random) -> dict:
    question, answer = general_pair(rng)
    turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if rng.random() < 0.1:
        turns.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
    return {"conversations": turns}


def write_synthetic(kind: str, samples: int, seed: int, folder: Path) -> Path:
    """General data in MiniMind's format, domain data in Alpaca's, so the default exercises two readers."""
    path = folder / f"{kind}-v{GENERATOR_VERSION}-seed{seed}-n{samples}.jsonl"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{kind}:{seed}")
    make = general_record if kind == "general" else domain_record
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # two runs may write it at once: each its own, same content
    with tmp.open("w", encoding="utf-8") as out:
        for _ in range(samples):
            out.write(json.dumps(make(rng), ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path
