"""Text normalization for CSM: what the speech model is given to say."""

from __future__ import annotations

import re

import pytest

from agent.speak.speech_text import normalize_for_speech, number_to_words, ordinal_to_words, year_to_words


@pytest.mark.parametrize(
    "n,words",
    [
        (0, "zero"), (7, "seven"), (13, "thirteen"), (21, "twenty-one"), (100, "one hundred"),
        (101, "one hundred one"), (999, "nine hundred ninety-nine"), (1000, "one thousand"),
        (12345, "twelve thousand three hundred forty-five"), (2_000_000, "two million"),
        (-4, "minus four"),
    ],
)  # fmt: skip
def test_number_to_words(n, words):
    assert number_to_words(n) == words


@pytest.mark.parametrize(
    "n,words",
    [(1, "first"), (2, "second"), (3, "third"), (5, "fifth"), (12, "twelfth"), (20, "twentieth"),
     (22, "twenty-second"), (100, "one hundredth"), (101, "one hundred first")],
)  # fmt: skip
def test_ordinal_to_words(n, words):
    assert ordinal_to_words(n) == words


@pytest.mark.parametrize(
    "year,words",
    [(1984, "nineteen eighty-four"), (1905, "nineteen oh five"), (2000, "two thousand"),
     (2005, "two thousand five"), (2024, "twenty twenty-four"), (1800, "eighteen hundred")],
)  # fmt: skip
def test_year_to_words(year, words):
    assert year_to_words(year) == words


@pytest.mark.parametrize(
    "text,spoken",
    [
        ("**Hello** there, `code` and [a link](http://x.com)!", "Hello there, code and a link!"),
        ("# Title\n- first item\n- second item", "Title. first item. second item."),
        ("I have 3 cats 🐱 and 21 dogs 😀.", "I have three cats and twenty-one dogs."),
        ("It costs $5.", "It costs five dollars."),
        ("Only $1.50 or $0.99!", "Only one dollar and fifty cents or ninety-nine cents!"),
        ("About $3 million.", "About three million dollars."),
        ("Pi is 3.14.", "Pi is three point one four."),
        ("Up 50% from 1,234 users.", "Up fifty percent from one thousand two hundred thirty-four users."),
        ("Meet at 3:30 pm or 10:05.", "Meet at three thirty P M or ten oh five."),
        ("Dinner at 7:00.", "Dinner at seven o'clock."),
        ("The 1st and 22nd place.", "The first and twenty-second place."),
        ("Back in 1984, Dr. Smith met Mr. Jones.", "Back in nineteen eighty-four, Doctor Smith met Mister Jones."),
        ("Fruit, e.g. apples, etc.", "Fruit, for example apples, et cetera."),
        ("Cats & dogs = fun + love @ home.", "Cats and dogs equals fun plus love at home."),
        ("It was -5 degrees, pages 3-5.", "It was minus five degrees, pages three to five."),
        ("Well (laughs) that's funny [1].", "Well that's funny."),
        ("Call 555-1234 now.", "Call five five five, one two three four now."),
        ("Room 221B on Baker St. today.", "Room two hundred twenty-one B on Baker Street today."),
        ("```python\nprint(1)\n```\nDone.", "Done."),
        ("It is 20°C, great 👍🏽!", "It is twenty degrees C, great!"),
        ("Steps:", "Steps."),
        ("", ""),
    ],
)
def test_normalize_for_speech(text, spoken):
    assert normalize_for_speech(text) == spoken


def test_normalized_text_has_no_digits_markdown_or_emoji():
    messy = "## Plan 🚀\n* **Step 1:** buy 2 eggs (~$3)\n* _Step 2_: [cook](http://a.b) at 180°\n> Enjoy 100%!"
    spoken = normalize_for_speech(messy)
    assert not re.search(r"[0-9*_#\[\]()`~$%🚀>]", spoken), spoken
    assert "\n" not in spoken and "  " not in spoken
