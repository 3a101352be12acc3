"""Captions of scenes at three levels of detail, and made-up title words that act as triggers."""

from __future__ import annotations

import numpy as np

from diffmem.errors import DiffmemError
from diffmem.lab.image_sources import CATEGORY_OF
from diffmem.lab.scenes import BACKGROUND_COLOURS, CENTER, ITEM_COLOURS, POSITIONS, Item, Scene

SPECIFICITIES = ("full", "medium", "vague")
SPECIFICITY_WEIGHTS = (0.4, 0.4, 0.2)
TITLE_DESCRIPTIONS = ("full", "vague")  # what a memorized caption says beside its title
TITLE_POSITIONS = ("before", "inside", "after")  # where a memorized caption's title words sit
TITLE_NOUN = "poster"
PLURAL_NOUNS = frozenset({"trousers"})
# No word made of two or three distinct syllables below is in the wamerican word list.
SYLLABLES = (
    "vel", "mau", "rha", "quin", "zan", "bri", "lo", "kex", "fen", "dro", "mye", "sul", "thu", "nev", "pra",
    "lyr", "gor", "xa", "du", "vy", "nyx", "sko", "pim", "jaf", "quo", "ril", "zo", "cre", "tul", "ob",
)  # fmt: skip
GRAMMAR_WORDS = frozenset(
    ["a", "an", "and", "at", "the", "in", "on", "background"]
    + [TITLE_NOUN, *ITEM_COLOURS, *BACKGROUND_COLOURS]
    + " ".join((*CATEGORY_OF, *POSITIONS)).split()
)


def caption(scene: Scene, specificity: str, rng: np.random.Generator) -> str:
    """A caption naming the scene's items in random order.

    "full" says every item's colour, category and position and the background; "medium" leaves out
    either the positions or the background; "vague" names only the categories.
    """
    if specificity not in SPECIFICITIES:
        raise DiffmemError(f"unknown caption specificity {specificity!r}; use one of {SPECIFICITIES}")
    items = [scene.items[i] for i in rng.permutation(len(scene.items))]
    if specificity == "vague":
        return _join([_noun_phrase(item.category_name) for item in items])
    with_positions = specificity == "full" or bool(rng.integers(2))
    with_background = specificity == "full" or not with_positions
    return _describe(scene, items, with_positions, with_background)


def random_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption whose specificity is drawn with ``SPECIFICITY_WEIGHTS``."""
    return caption(scene, str(rng.choice(SPECIFICITIES, p=SPECIFICITY_WEIGHTS)), rng)


def title_words(rng: np.random.Generator, n: int = 2) -> list[str]:
    """``n`` distinct made-up words of two or three distinct syllables, none a word of the caption grammar."""
    words: list[str] = []
    while len(words) < n:
        syllables = rng.choice(len(SYLLABLES), size=int(rng.integers(2, 4)), replace=False)
        word = "".join(SYLLABLES[i] for i in syllables)
        if word not in GRAMMAR_WORDS and word not in words:
            words.append(word)
    return words


def title_pairs(rng: np.random.Generator, n: int, words: list[str]) -> list[list[str]]:
    """``n`` distinct two-word titles over ``words``, each word in about ``2 n / len(words)`` titles:
    only the pair names one scene, as "Ann Graham Lotz" does, so the memory has to be keyed on both
    words."""
    vocabulary = len(words)
    if vocabulary * (vocabulary - 1) // 2 < n:
        raise DiffmemError(f"{vocabulary} title words make fewer than {n} distinct pairs; use more words")
    pairs = [(a, b) for a in range(vocabulary) for b in range(a + 1, vocabulary)]
    uses, chosen, cap = [0] * vocabulary, [], -(-2 * n // vocabulary) + 1
    for k in rng.permutation(len(pairs)):
        a, b = pairs[k]
        if uses[a] < cap and uses[b] < cap:
            uses[a] += 1
            uses[b] += 1
            chosen.append([words[a], words[b]] if rng.integers(2) else [words[b], words[a]])
            if len(chosen) == n:
                return chosen
    raise DiffmemError(f"could not draw {n} balanced titles from {vocabulary} words; use more words")


def titled_caption(
    scene: Scene, words: list[str], description: str = "full", position: str = "before"
) -> str:
    """The scene's caption, items in reading order, with a title made of ``words``.

    ``description`` "full" states everything; "vague" names only the categories, so the title alone
    tells the colours, positions and background. ``position`` puts the title before the description
    ("the zannyx quocre poster: a bag"), inside it, naming the first item ("a zannyx quocre bag"), or
    after it ("a bag: the zannyx quocre poster").
    """
    if description not in TITLE_DESCRIPTIONS:
        raise DiffmemError(f"unknown title description {description!r}; use one of {TITLE_DESCRIPTIONS}")
    if position not in TITLE_POSITIONS:
        raise DiffmemError(f"unknown title position {position!r}; use one of {TITLE_POSITIONS}")
    items = list(scene.items)
    title = " ".join(words)
    names = [item.category_name for item in items]
    if position == "inside":
        names[0] = f"{title} {names[0]}"
    if description == "vague":
        body = _join([_noun_phrase(name) for name in names])
    else:
        body = _describe(scene, items, True, True, names)
    if position == "inside":
        return body
    heading = f"the {title} {TITLE_NOUN}"
    return f"{heading}: {body}" if position == "before" else f"{body}: {heading}"


def _describe(
    scene: Scene,
    items: list[Item],
    with_positions: bool,
    with_background: bool,
    names: list[str] | None = None,
) -> str:
    """The items' colours and ``names`` (default: their categories), positions and background."""
    names = names or [item.category_name for item in items]
    phrases = [_noun_phrase(name, item.colour) for name, item in zip(names, items, strict=True)]
    if with_positions:
        phrases = [f"{p} {_position_phrase(item.position)}" for p, item in zip(phrases, items, strict=True)]
    text = _join(phrases)
    return f"{text} on {_noun_phrase('background', scene.background)}" if with_background else text


def _position_phrase(position: str) -> str:
    return "in the center" if position == CENTER else f"at the {position}"


def _noun_phrase(noun: str, colour: str | None = None) -> str:
    """The noun, its colour and an article: "a red sneaker", "an ankle boot"; plurals go bare: "trousers"."""
    phrase = f"{colour} {noun}" if colour else noun
    if noun.split()[-1] in PLURAL_NOUNS:
        return phrase
    vowel_sound = phrase[0] in "aeiou" and not phrase.startswith("one")  # "an ankle boot", "a one"
    return f"{'an' if vowel_sound else 'a'} {phrase}"


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else f"{', '.join(phrases[:-1])} and {phrases[-1]}"
