"""Error injection: rewrite a correct answer into a wrong but plausible one.

Two ways: prompts for a text LLM (``description`` and few-shot ``qa`` modes, as in the paper), and the
``rules`` injector, which needs no model: seeded edits from word lists (``vocabulary.py``) — swap a colour, change a count,
mirror a position, swap an object for one that usually co-occurs with it, add a companion object that is
not there, drop a sentence. Pure functions; every rules output differs from its input.
"""

from __future__ import annotations

import functools
import random
import re

from bpo_ray.negatives.vocabulary import GENERAL, Vocabulary


def _replace_word(text: str, start: int, end: int, new: str) -> str:
    old = text[start:end]
    if old[:1].isupper():
        new = new[:1].upper() + new[1:]
    return text[:start] + new + text[end:]


def _word_matches(text: str, words) -> list[re.Match]:
    return list(_any_word(tuple(words)).finditer(text))


@functools.lru_cache(maxsize=64)
def _any_word(words: tuple[str, ...]) -> re.Pattern:
    """One pattern for a vocabulary's list, longest first ("traffic light" before "light"); built once."""
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")\b",
                      flags=re.IGNORECASE)


@functools.lru_cache(maxsize=16)
def _each_word(words: tuple[str, ...]) -> tuple[re.Pattern, ...]:
    """A pattern per word, in order: which of them a text names (overlapping names each count)."""
    return tuple(re.compile(rf"\b{re.escape(w)}\b") for w in words)


def indefinite_article(word: str) -> str:
    return "an" if word[:1].lower() in ("a", "e", "i", "o", "u") else "a"


def _article(text: str, start: int, new: str) -> tuple[str, int]:
    """``a``/``an`` before ``new`` where the word before ``start`` is an article."""
    m = re.search(r"\b(an?)\s+$", text[:start], flags=re.IGNORECASE)
    if not m:
        return text, start
    wanted = indefinite_article(new)
    if m.group(1)[:1].isupper():
        wanted = wanted.capitalize()
    fixed = text[:m.start(1)] + wanted + text[m.end(1):]
    return fixed, start + len(fixed) - len(text)


def swap_color(text: str, rng: random.Random, vocab: Vocabulary = GENERAL) -> tuple[str, str] | None:
    found = _word_matches(text, vocab.colors)
    if not found:
        return None
    m = rng.choice(found)
    new = rng.choice([c for c in vocab.colors if c != m.group(0).lower()])
    return _replace_word(text, m.start(), m.end(), new), f"color:{m.group(0).lower()}->{new}"


def change_count(text: str, rng: random.Random, vocab: Vocabulary = GENERAL) -> tuple[str, str] | None:
    found = _word_matches(text, vocab.numbers) + list(re.finditer(r"\b([2-9]|[1-9]\d)\b", text))
    if not found:
        return None
    m = rng.choice(found)
    old = m.group(0).lower()
    if old.isdigit():
        new = str(int(old) + rng.choice([-1, 1, 2]) if int(old) > 2 else int(old) + 1)
    else:
        new = rng.choice([n for n in vocab.numbers if n != old])
    return _replace_word(text, m.start(), m.end(), new), f"count:{old}->{new}"


def mirror_position(text: str, rng: random.Random, vocab: Vocabulary = GENERAL) -> tuple[str, str] | None:
    found = _word_matches(text, vocab.relations)
    if not found:
        return None
    m = rng.choice(found)
    new = vocab.relations[m.group(0).lower()]
    return _replace_word(text, m.start(), m.end(), new), f"position:{m.group(0).lower()}->{new}"


def swap_object(text: str, rng: random.Random, vocab: Vocabulary = GENERAL) -> tuple[str, str] | None:
    """An object for another of its kind, in the same number (``vocab.swaps``), its article agreeing."""
    found = _word_matches(text, vocab.swaps)
    if not found:
        return None
    m = rng.choice(found)
    new = rng.choice(vocab.swaps[m.group(0).lower()])
    fixed, start = _article(text, m.start(), new)
    return _replace_word(fixed, start, start + len(m.group(0)), new), f"object:{m.group(0).lower()}->{new}"


def add_companion(text: str, rng: random.Random, vocab: Vocabulary = GENERAL) -> tuple[str, str]:
    """Name an object the prior suggests but the image does not have: the hallucination BPO targets.
    Always applicable, so it is the fallback that guarantees a change."""
    lower = text.lower()
    anchors = zip(vocab.companions.items(), _each_word(tuple(vocab.companions)), strict=True)
    companions = [c for (_, cs), named in anchors if named.search(lower) for c in cs if c not in lower]
    if not companions:
        companions = [c for c in vocab.fallback_companions if c not in lower] or ["dog"]
    companion = rng.choice(companions)
    where = rng.choice(vocab.places)
    sentence = vocab.added.format(a=indefinite_article(companion), object=companion, place=where)
    joiner = "" if not text or text.endswith((" ", "\n")) else " "
    return text + joiner + sentence, f"add:{companion}"


def drop_sentence(text: str, rng: random.Random) -> tuple[str, str] | None:
    sentences = re.split(r"(?<=[.!?])\s+", text.strip())
    if len(sentences) < 3:  # keep at least two: a one-line answer would just become empty
        return None
    index = rng.randrange(1, len(sentences))
    return " ".join(s for i, s in enumerate(sentences) if i != index), f"drop:sentence{index}"


def flip_polarity(text: str, rng: random.Random) -> tuple[str, str] | None:
    """Yes/no answers: the wrong answer is the opposite one. Swapping a noun in "No, there is no red
    circle" would leave it true (there is no brown square either)."""
    m = re.match(r"^\s*(yes|no)\b[,.]?\s*", text, flags=re.IGNORECASE)
    if not m:
        return None
    rest = text[m.end():]
    if m.group(1).lower() == "yes":
        flipped = re.sub(r"\b(there (?:is|are))( an?)? ", r"\1 no ", rest, count=1, flags=re.IGNORECASE)
        if flipped == rest:
            flipped = re.sub(r"\b(it is|they are)\b", r"\1 not", rest, count=1, flags=re.IGNORECASE)
        return "No, " + (flipped if flipped != rest else "that is not in the image."), "polarity:yes->no"
    flipped = re.sub(r"\b(there (?:is|are)) no (\w)", lambda g: f"{g.group(1)} " + _article_for(g), rest,
                     count=1, flags=re.IGNORECASE)
    if flipped == rest:
        flipped = re.sub(r"\b(it is|they are) not\b", r"\1", rest, count=1, flags=re.IGNORECASE)
    return "Yes, " + (flipped if flipped != rest else "it is in the image."), "polarity:no->yes"


def _article_for(g: re.Match) -> str:
    """"there is no X" → "there is a/an X"; "there are no Xs" → "there are Xs"."""
    if g.group(1).lower().endswith("are"):
        return g.group(2)
    return f"{indefinite_article(g.group(2))} {g.group(2)}"


EDITS = (swap_color, change_count, mirror_position, swap_object, drop_sentence)


def _normalized(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def rules_inject(answer: str, seed: int, max_edits: int = 2, vocabulary: Vocabulary = GENERAL) -> tuple[str, list[str]]:
    """Seeded edits of a correct answer; the result always differs from it (after normalisation)."""
    rng = random.Random(seed)
    flipped = flip_polarity(answer, rng)
    if flipped is not None:  # a yes/no answer: its wrong twin is the other polarity, and nothing else
        return flipped[0], [flipped[1]]
    text, applied = answer, []
    edits = list(EDITS)
    rng.shuffle(edits)
    for edit in edits:
        if len(applied) >= max(1, rng.randint(1, max_edits)):
            break
        result = edit(text, rng) if edit is drop_sentence else edit(text, rng, vocabulary)
        if result is not None and _normalized(result[0]) != _normalized(text):
            text, label = result
            applied.append(label)
    if rng.random() < 0.3 or _normalized(text) == _normalized(answer):
        text, label = add_companion(text, rng, vocabulary)
        applied.append(label)
    return text, applied


# ------------------------------------------------------------------------------------------ LLM prompts
DESCRIPTION_PROMPT = (
    "Below is a correct description of an image. Rewrite it so that it describes a similar but different "
    "image: add or delete objects, and change the colour, shape, size or location of some of them. Keep it "
    "natural, common and logical, in the same style and length. Output only the rewritten description.\n\n"
    "Description: {answer}"
)
QA_FEW_SHOT = [
    ("How many dogs are on the grass?", "There are two dogs on the grass.", "There are three dogs on the grass."),
    ("What color is the car?", "The car is red.", "The car is blue."),
    ("What is on the table?", "A cup and a plate are on the table.", "A cup, a fork and a bowl are on the table."),
]
QA_PROMPT = (
    "Imagine a similar but different image, and rewrite the answer to the question for that image: change "
    "counts, colors, objects or positions. Output only the rewritten answer.\n\n{examples}"
    "Question: {question}\nAnswer: {answer}\nRewritten:"
)


def injection_mode(mode: str, answer: str) -> str:
    """``auto``: long answers are descriptions, short ones QA."""
    if mode != "auto":
        return mode
    return "description" if len(answer.split()) > 25 else "qa"


def injection_messages(question: str, answer: str, mode: str) -> list[dict]:
    """Chat messages asking a text LLM for the wrong-but-plausible rewrite."""
    if injection_mode(mode, answer) == "description":
        content = DESCRIPTION_PROMPT.format(answer=answer)
    else:
        examples = "".join(f"Question: {q}\nAnswer: {a}\nRewritten: {r}\n\n" for q, a, r in QA_FEW_SHOT)
        content = QA_PROMPT.format(examples=examples, question=question, answer=answer)
    return [{"role": "user", "content": content}]


def clean_llm_rewrite(text: str) -> str:
    """Strip the preambles LLMs add ("Rewritten: ...", quotes)."""
    text = text.strip()
    text = re.sub(r"^(rewritten( description| answer)?|answer|description)\s*:\s*", "", text, flags=re.IGNORECASE)
    return text.strip().strip('"').strip()
