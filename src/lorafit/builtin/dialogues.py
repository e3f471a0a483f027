"""A deterministic, synthetic samsum-style data set: short chats and their one-line summaries.

The embedded default must run offline, so it cannot download samsum. These chats are generated
from a fixed seed out of everyday scenarios (meeting up, borrowing, running late, errands, ...),
with varied names, places, times, fillers and phrasing, and a summary written in samsum's terse
third-person style. The content is original to lorafit (Apache-2.0, like the package).

``builtin:dialogues`` is the training split, ``builtin:dialogues-test`` a disjoint test split
(different seed), each a .jsonl with ``id``, ``dialogue`` and ``summary`` columns.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path

from lorafit.errors import LorafitError
from lorafit.paths import cache_root

VERSION = "v1"
SPLITS = {"dialogues": (2000, 1234), "dialogues-test": (200, 98765)}

NAMES = [
    ("Anna", "she"), ("Tom", "he"), ("Maria", "she"), ("James", "he"), ("Sophie", "she"),
    ("Daniel", "he"), ("Emma", "she"), ("Lucas", "he"), ("Olivia", "she"), ("Noah", "he"),
    ("Mia", "she"), ("Ethan", "he"), ("Chloe", "she"), ("Ben", "he"), ("Laura", "she"),
    ("Peter", "he"), ("Julia", "she"), ("Mark", "he"), ("Kate", "she"), ("Adam", "he"),
    ("Hannah", "she"), ("Jack", "he"), ("Eva", "she"), ("Oscar", "he"), ("Lily", "she"),
    ("Sam", "he"), ("Zoe", "she"), ("Leo", "he"), ("Grace", "she"), ("Victor", "he"),
    ("Nina", "she"), ("Paul", "he"), ("Rita", "she"), ("Igor", "he"), ("Tina", "she"),
    ("Hugo", "he"), ("Alice", "she"), ("Max", "he"), ("Ruby", "she"), ("Felix", "he"),
]
PLACES = ["cinema", "park", "library", "gym", "station", "mall", "cafe", "office", "museum", "beach",
          "pub", "bakery", "pool", "market", "stadium"]
TIMES = ["6 pm", "7 pm", "8 pm", "noon", "10 am", "9 am", "5:30 pm", "4 pm", "11 am", "7:30 pm"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "tomorrow"]
ITEMS = ["charger", "umbrella", "bike", "drill", "laptop", "camera", "tent", "car", "blue jacket",
         "guitar", "ladder", "projector"]
GROCERIES = ["milk", "bread", "eggs", "apples", "coffee", "cheese", "rice", "tomatoes", "butter",
             "bananas", "pasta", "yogurt"]
REASONS_LATE = ["traffic", "a delayed train", "a flat tyre", "a long meeting", "the rain",
                "a road closure"]
REASONS_CANCEL = ["sick", "stuck at work", "visiting family", "too tired", "on a deadline"]
GIFTS = ["book", "scarf", "watch", "board game", "plant", "cookbook", "headphones"]
EVENTS = ["the dinner", "the yoga class", "the football match", "the concert", "the party",
          "the meeting"]
MOVIES = ["Dune", "Inception", "Amelie", "Up", "Heat", "Alien", "Coco", "Rocky"]
RESTAURANTS = ["Luigi's", "the Thai place on Main Street", "Sakura", "The Green Fork", "Casa Maya"]
TASKS = ["report", "presentation", "tax forms", "essay", "budget", "CV"]
PETS = ["cat", "dog", "parrot", "fish", "rabbit", "plants"]
CITIES = ["Berlin", "Paris", "Madrid", "Rome", "Lisbon", "Vienna", "Prague", "Oslo"]
DISHES = ["lasagne", "curry", "soup", "tacos", "risotto", "pancakes"]
DRINKS = ["wine", "juice", "beer", "lemonade", "dessert"]
GREETINGS = ["Hi!", "Hey", "Hello :)", "hey you", "Hi there", "Morning!", "yo"]
ACKS = ["OK", "Sure", "Great", "Perfect", "Sounds good", "Cool", "Deal", "Fine by me", "Alright"]
THANKS = ["Thanks!", "Thank you so much", "You're the best", "thx", "Thanks a lot"]
BYES = ["See you!", "Bye", "Talk later", "see ya", ":)", "Take care"]

Scenario = Callable[[random.Random, str, str, str, str], tuple[list[tuple[int, str]], str]]


def _possessive(pronoun: str) -> str:
    return "her" if pronoun == "she" else "his"


def _meet(r: random.Random, a: str, b: str, pa: str, pb: str):
    place, time, day = r.choice(PLACES), r.choice(TIMES), r.choice(DAYS)
    lines = [(0, f"{r.choice(GREETINGS)} Do you want to go to the {place} on {day}?"),
             (1, "Sure, what time?"), (0, f"How about {time}?"), (1, r.choice(ACKS))]
    return lines, f"{a} and {b} will meet at the {place} on {day} at {time}."


def _borrow(r: random.Random, a: str, b: str, pa: str, pb: str):
    item, day = r.choice(ITEMS), r.choice(DAYS)
    lines = [(0, f"{r.choice(GREETINGS)} Can I borrow your {item}?"), (1, "What for?"),
             (0, "I need it for a few days, mine is broken."),
             (1, f"No problem, I'll bring it on {day}."), (0, r.choice(THANKS))]
    return lines, f"{b} will lend {a} {_possessive(pb)} {item} on {day}."


def _late(r: random.Random, a: str, b: str, pa: str, pb: str):
    minutes, reason = r.choice([10, 15, 20, 30, 45]), r.choice(REASONS_LATE)
    lines = [(0, f"I'm so sorry, I'll be {minutes} minutes late"), (1, "What happened?"),
             (0, f"{reason[0].upper() + reason[1:]}..."), (1, f"{r.choice(ACKS)}, I'll wait for you.")]
    return lines, f"{a} is running {minutes} minutes late because of {reason}. {b} will wait."


def _shopping(r: random.Random, a: str, b: str, pa: str, pb: str):
    first, second = r.sample(GROCERIES, 2)
    lines = [(0, "Are you passing by the shop on your way home?"), (1, "Yes, need anything?"),
             (0, f"Could you get {first} and {second}?"), (1, r.choice(ACKS)), (0, r.choice(THANKS))]
    return lines, f"{b} will buy {first} and {second} on the way home for {a}."


def _birthday(r: random.Random, a: str, b: str, pa: str, pb: str):
    (c, pc), gift, day = r.choice(NAMES), r.choice(GIFTS), r.choice(DAYS)
    lines = [(0, f"Don't forget it's {c}'s birthday on {day}!"), (1, "Oh no, I forgot. Any ideas for a gift?"),
             (0, f"Maybe a {gift}? We could buy it together."), (1, f"{r.choice(ACKS)}, let's do that.")]
    return lines, f"{a} and {b} will buy {c} a {gift} for {_possessive(pc)} birthday on {day}."


def _cancel(r: random.Random, a: str, b: str, pa: str, pb: str):
    event, reason, day = r.choice(EVENTS), r.choice(REASONS_CANCEL), r.choice(DAYS)
    lines = [(0, f"I can't make it to {event} today, I'm {reason}."), (1, "Oh, that's a pity."),
             (0, f"Can we move it to {day}?"), (1, f"{r.choice(ACKS)}. {r.choice(BYES)}")]
    return lines, f"{a} can't go to {event} today because {pa} is {reason}. They moved it to {day}."


def _lost(r: random.Random, a: str, b: str, pa: str, pb: str):
    item, place = r.choice(["keys", "wallet", "phone", "glasses", "scarf", "headphones"]), r.choice(PLACES)
    lines = [(0, f"Have you seen my {item}? I can't find them anywhere."),
             (1, f"I think you left them at the {place} yesterday."),
             (1, "I picked them up, they're with me now."), (0, f"Phew! {r.choice(THANKS)}")]
    return lines, f"{b} found {a}'s {item} at the {place} and has them now."


def _recommend(r: random.Random, a: str, b: str, pa: str, pb: str):
    if r.random() < 0.5:
        thing = r.choice(MOVIES)
        lines = [(0, "Any good movie for tonight?"), (1, f"Watch {thing}, it's great."),
                 (0, f"Haven't seen it yet. {r.choice(ACKS)}!")]
        return lines, f"{b} recommends the movie {thing} to {a} for tonight."
    thing = r.choice(RESTAURANTS)
    lines = [(0, "Where should we eat on Friday?"), (1, f"Try {thing}, the food is amazing."),
             (0, f"{r.choice(ACKS)}, I'll book a table.")]
    return lines, f"{b} recommends {thing} and {a} will book a table for Friday."


def _help(r: random.Random, a: str, b: str, pa: str, pb: str):
    task, day, time = r.choice(TASKS), r.choice(DAYS), r.choice(TIMES)
    lines = [(0, f"My {task} is due on {day} and I'm stuck."), (1, "Want me to take a look?"),
             (0, "That would be amazing."), (1, f"I'm free after {time}, let's go through it then."),
             (0, r.choice(THANKS))]
    return lines, f"{b} will help {a} with the {task} after {time}. It is due on {day}."


def _pet(r: random.Random, a: str, b: str, pa: str, pb: str):
    pet, city, day = r.choice(PETS), r.choice(CITIES), r.choice(DAYS)
    lines = [(0, f"I'm going to {city} until {day}. Could you look after my {pet}?"),
             (1, "Of course! Where are the keys?"), (0, "Under the mat as usual."),
             (1, r.choice(ACKS)), (0, f"{r.choice(THANKS)} {r.choice(BYES)}")]
    return lines, f"{b} will look after {a}'s {pet} while {a} is in {city} until {day}."


def _dinner(r: random.Random, a: str, b: str, pa: str, pb: str):
    dish, drink, time = r.choice(DISHES), r.choice(DRINKS), r.choice(TIMES)
    lines = [(0, f"I'm making {dish} tonight, come over at {time}?"), (1, "Yes! Should I bring something?"),
             (0, f"Bring some {drink} if you can."), (1, r.choice(ACKS))]
    return lines, f"{a} is cooking {dish} tonight at {time} and {b} will bring {drink}."


def _ride(r: random.Random, a: str, b: str, pa: str, pb: str):
    place, time = r.choice(PLACES), r.choice(TIMES)
    lines = [(0, f"Could you pick me up from the {place}?"), (1, "When?"), (0, f"Around {time}."),
             (1, f"{r.choice(ACKS)}, I'll be there at {time}."), (0, r.choice(THANKS))]
    return lines, f"{b} will pick {a} up from the {place} at {time}."


SCENARIOS: list[Scenario] = [_meet, _borrow, _late, _shopping, _birthday, _cancel, _lost,
                             _recommend, _help, _pet, _dinner, _ride]


def generate(count: int, seed: int) -> list[dict[str, str]]:
    """Return ``count`` rows ``{id, dialogue, summary}``, the same for the same seed."""
    r = random.Random(seed)
    rows = []
    for index in range(count):
        (a, pa), (b, pb) = r.sample(NAMES, 2)
        lines, summary = r.choice(SCENARIOS)(r, a, b, pa, pb)
        if r.random() < 0.4:
            lines = [(0, r.choice(GREETINGS)), (1, r.choice(GREETINGS))] + lines
        if r.random() < 0.3:
            lines = lines + [(1, r.choice(BYES))]
        speakers = (a, b)
        dialogue = "\n".join(f"{speakers[who]}: {text}" for who, text in lines)
        rows.append({"id": f"{seed}-{index:05d}", "dialogue": dialogue, "summary": summary})
    return rows


def materialize_dialogues(name: str) -> Path:
    """Write split ``name`` to the cache once (atomically) and return the .jsonl path."""
    if name not in SPLITS:
        known = ", ".join(f"builtin:{n}" for n in SPLITS)
        raise LorafitError(f"data.path: unknown builtin data set 'builtin:{name}' (known: {known})")
    target = cache_root() / "data" / f"builtin-{name}-{VERSION}.jsonl"
    if target.exists():
        return target
    count, seed = SPLITS[name]
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with staging.open("w", encoding="utf-8") as handle:
        for row in generate(count, seed):
            handle.write(json.dumps(row) + "\n")
    staging.replace(target)
    return target
