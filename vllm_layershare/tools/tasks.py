"""Long-context retrieval probes built from token ids, with a fixed seed.

- needle in a haystack: one sentence with a number, placed at a depth (0-100%) of
  an essay haystack of a given token length, asked back in a chat turn;
- key-value retrieval (RULER-style multi-key): several key-value sentences hidden at
  seeded places in repeated filler text; the value of one key is asked back.

Prompts are assembled from token ids so that each one has exactly the length asked.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

CITIES = ("Lisbon", "Nairobi", "Oslo", "Lima", "Hanoi", "Quito", "Tunis", "Riga", "Dakar",
          "Perth", "Porto", "Seoul")
MARK = "\x00LAYERSHARE\x00"


@dataclass(frozen=True)
class Probe:
    """One prompt and the string a correct answer contains."""

    task: str
    length: int
    depth: int
    prompt_ids: list[int]
    answer: str


class ChatFrame:
    """Token ids before and after the user message of the model's chat template."""

    def __init__(self, tokenizer, instruction: str) -> None:
        self.tokenizer = tokenizer
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{instruction}\n\n{MARK}"}],
            tokenize=False, add_generation_prompt=True)
        before, self.after_text = text.split(MARK)
        self.before = self.encode(before)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def wrap(self, body: list[int], question: str) -> list[int]:
        return self.before + body + self.encode(f"\n\n{question}{self.after_text}")


def needle_probes(tokenizer, haystack: list[int], lengths: list[int], depths: list[int],
                  trials: int, seed: int = 0, reserve: int = 16) -> list[Probe]:
    """A magic number hidden at each depth of each haystack length, `trials` times.

    Each prompt is `length - reserve` tokens long, leaving room for the answer."""
    rng = random.Random(seed)
    frame = ChatFrame(tokenizer, "Read the document below; a question about it follows.")
    probes = []
    for length in lengths:
        for depth in depths:
            for _ in range(trials):
                city, number = rng.choice(CITIES), str(rng.randint(100000, 999999))
                needle = frame.encode(f" The special magic number for {city} is {number}. ")
                question = (f"What is the special magic number for {city}? "
                            "Answer with the number only.")
                room = length - reserve - len(frame.wrap([], question)) - len(needle)
                start = rng.randrange(0, len(haystack) - room)
                hay = haystack[start:start + room]
                cut = sentence_end(tokenizer, hay, round(depth / 100 * room))
                body = hay[:cut] + needle + hay[cut:]
                probes.append(Probe("needle", length, depth, frame.wrap(body, question), number))
    return probes


def sentence_end(tokenizer, ids: list[int], position: int) -> int:
    """The nearest position at or before `position` that follows a full stop."""
    for cut in range(position, max(position - 64, 0), -1):
        if "." in tokenizer.decode(ids[cut - 1:cut]):
            return cut
    return position


def kv_probes(tokenizer, lengths: list[int], per_length: int, seed: int = 0,
              reserve: int = 16, keys: int = 2) -> list[Probe]:
    """Multi-key retrieval (RULER-style, no corpus): `keys` key-value sentences hidden in
    repeated filler; one key is asked. Prompts are `length - reserve` tokens long."""
    rng = random.Random(seed)
    frame = ChatFrame(tokenizer, "Some special magic numbers are hidden in the text below.")
    filler = frame.encode(FILLER)
    probes = []
    for length in lengths:
        for trial in range(per_length):
            pairs = {key: random_value(rng) for key in rng.sample(WORDS, keys)}
            sentences = [frame.encode(f" One of the special magic numbers for {k} is: {v}. ")
                         for k, v in pairs.items()]
            asked = trial % keys
            key = list(pairs)[asked]
            question = f"What is the special magic number for {key}? Answer with the number only."
            room = length - reserve - len(frame.wrap([], question)) - sum(map(len, sentences))
            slots = room // len(filler)
            if slots + 1 < keys:
                raise ValueError(f"{length} tokens are too few to hide {keys} keys in filler")
            cuts = sorted(rng.sample(range(slots + 1), keys))  # at filler boundaries
            hay = (filler * (slots + 1))[:room]
            body, previous = [], 0
            for cut, sentence in zip(cuts, sentences, strict=True):
                body += hay[previous * len(filler):cut * len(filler)] + sentence
                previous = cut
            body += hay[previous * len(filler):]
            depth = round(100 * cuts[asked] / max(slots, 1))
            probes.append(Probe("kv", length, depth, frame.wrap(body, question), pairs[key]))
    return probes


FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
WORDS = ("amber", "brisk", "cedar", "delta", "ember", "fable", "glade", "harbor", "ivory",
         "jolly", "kettle", "lemon", "maple", "noble", "orbit", "pebble", "quartz", "raven",
         "saddle", "timber", "umber", "velvet", "willow", "yonder", "zephyr", "canyon",
         "falcon", "garnet", "hollow", "lantern")


def random_value(rng: random.Random) -> str:
    return str(rng.randint(100000, 999999))


def is_correct(probe: Probe, output: str) -> bool:
    return probe.answer in output
