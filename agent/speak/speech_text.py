"""Turn LLM text into plain words that CSM can say.

CSM reads its text literally: digits, markdown, brackets and abbreviations derail it. This
module rewrites them as spoken words with no dependencies: a small number-to-words, a table of
common abbreviations, and regular expressions for markdown, money, times and percentages.
"""

from __future__ import annotations

import re
import unicodedata

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand"))
_ORDINAL_WORDS = {
    "one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
    "nine": "ninth", "twelve": "twelfth",
}  # fmt: skip


def _below_thousand(n: int) -> str:
    words = []
    if n >= 100:
        words.append(f"{_ONES[n // 100]} hundred")
        n %= 100
    if n >= 20:
        words.append(_TENS[n // 10] + (f"-{_ONES[n % 10]}" if n % 10 else ""))
    elif n or not words:
        words.append(_ONES[n])
    return " ".join(words)


def number_to_words(n: int) -> str:
    """Spell an integer in English words: 1234 -> "one thousand two hundred thirty-four"."""
    if n < 0:
        return "minus " + number_to_words(-n)
    if n < 1000:
        return _below_thousand(n)
    if n >= 10**15:  # too long to be worth saying as a number: read the digits
        return " ".join(_ONES[int(d)] for d in str(n))
    words = []
    for value, name in _SCALES:
        if n >= value:
            words.append(f"{_below_thousand(n // value)} {name}")
            n %= value
    if n:
        words.append(_below_thousand(n))
    return " ".join(words)


def ordinal_to_words(n: int) -> str:
    """Spell an ordinal: 1 -> "first", 22 -> "twenty-second", 100 -> "one hundredth"."""
    words = number_to_words(n)
    head, sep, last = words.rpartition("-") if "-" in words.split(" ")[-1] else words.rpartition(" ")
    if last in _ORDINAL_WORDS:
        last = _ORDINAL_WORDS[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return head + sep + last


def year_to_words(n: int) -> str:
    """Say a year as people do: 1984 -> "nineteen eighty-four", 2005 -> "two thousand five"."""
    if 2000 <= n <= 2009 or n % 1000 == 0:
        return number_to_words(n)
    high, low = divmod(n, 100)
    if low == 0:
        return f"{number_to_words(high)} hundred"
    if low < 10:
        return f"{number_to_words(high)} oh {_ONES[low]}"
    return f"{number_to_words(high)} {number_to_words(low)}"


def _digits(text: str) -> str:
    return " ".join(_ONES[int(d)] for d in text)


def decimal_to_words(text: str) -> str:
    """Say a decimal numeral digit by digit after the point: "3.14" -> "three point one four"."""
    whole, _, frac = text.partition(".")
    whole_words = number_to_words(int(whole.replace(",", ""))) if whole else "zero"
    return f"{whole_words} point {_digits(frac)}" if frac else whole_words


def _cardinal(text: str) -> str:
    """Words for a numeral that may have thousands separators or a decimal part."""
    text = text.replace(",", "")
    return decimal_to_words(text) if "." in text else number_to_words(int(text))


# --------------------------------------------------------------------------- abbreviations

_ABBREVIATIONS = {
    "Dr.": "Doctor", "Mr.": "Mister", "Mrs.": "Missus", "Ms.": "Miz", "Prof.": "Professor",
    "Jr.": "Junior", "Sr.": "Senior", "vs.": "versus", "etc.": "et cetera",
    "e.g.": "for example", "i.e.": "that is", "approx.": "approximately", "min.": "minutes",
    "max.": "maximum", "no.": "number", "Inc.": "Incorporated", "Ltd.": "Limited",
    "Mt.": "Mount", "St.": "Street", "a.m.": "A M", "p.m.": "P M", "U.S.": "U S", "U.K.": "U K",
}  # fmt: skip
_ABBREVIATION_RE = re.compile(
    r"(?<![\w.])(" + "|".join(re.escape(a) for a in sorted(_ABBREVIATIONS, key=len, reverse=True)) + r")(?!\w)",
    re.IGNORECASE,
)
_ABBREVIATION_LOOKUP = {a.lower(): b for a, b in _ABBREVIATIONS.items()}

_SYMBOLS = {
    "&": " and ", "%": " percent ", "+": " plus ", "=": " equals ", "@": " at ", "#": " number ",
    "°": " degrees ", "×": " times ", "÷": " divided by ", "→": " to ", "<": " less than ",
    ">": " greater than ", "/": " slash ", "~": " about ", "^": " to the power of ",
}  # fmt: skip
_CURRENCIES = {"$": ("dollar", "dollars", "cent", "cents"), "€": ("euro", "euros", "cent", "cents"),
               "£": ("pound", "pounds", "penny", "pence")}  # fmt: skip
_SCALE_WORDS = r"(?:\s+(thousand|million|billion|trillion))?"


# --------------------------------------------------------------------------- markdown & clean up

_MARKDOWN_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"```.*?```", re.S), " "),  # fenced code blocks are not for speaking
    (re.compile(r"!\[([^\]]*)\]\([^)]*\)"), r"\1"),  # images -> alt text
    (re.compile(r"\[([^\]]+)\]\([^)]*\)"), r"\1"),  # links -> their text
    (re.compile(r"<https?://[^>]+>"), " "),
    (re.compile(r"https?://\S+"), " "),
    (re.compile(r"`([^`]*)`"), r"\1"),
    (re.compile(r"(\*\*|__)(.+?)\1"), r"\2"),
    (re.compile(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?!\w)"), r"\1"),
    (re.compile(r"(?<![\w_])_(?!\s)(.+?)(?<!\s)_(?![\w_])"), r"\1"),
    (re.compile(r"~~(.+?)~~"), r"\1"),
    (re.compile(r"^\s{0,3}#{1,6}\s*", re.M), ""),  # headers
    (re.compile(r"^\s*>\s?", re.M), ""),  # block quotes
    (re.compile(r"^\s*(?:[-*+•]|\d+[.)])\s+", re.M), ""),  # bullets and numbered lists
    (re.compile(r"^\s*(?:-{3,}|\*{3,}|_{3,})\s*$", re.M), ""),  # rules
    (re.compile(r"^\s*\|?(?:\s*:?-+:?\s*\|)+\s*$", re.M), ""),  # table separators
    (re.compile(r"\s*\|\s*"), ", "),  # table cells
]

# Stage directions and citations ("[laughs]", "(smiles)", "[1]") are read out literally: drop them
# when they are short markers, keep the words of longer parenthetical remarks.
_MARKER_RE = re.compile(r"\[\s*\d+\s*\]|[\[(*]\s*[a-z]+(?:\s+[a-z]+)?\s*[\])*]")
_BRACKETS_RE = re.compile(r"[\[\]{}<>()]")


def _strip_emoji(text: str) -> str:
    out = []
    for ch in text:
        category = unicodedata.category(ch)
        # Emoji and pictographs are "other symbols"; the ones we can say (°, →) are kept for later.
        if (category == "So" and ch not in _SYMBOLS) or category == "Cs" or ch in "\u200d\ufe0f\ufe0e":
            continue
        if 0x1F3FB <= ord(ch) <= 0x1F3FF:  # emoji skin-tone modifiers
            continue
        out.append(ch)
    return "".join(out)


_SENTENCE_FINAL_ABBREVIATIONS = {"etc.", "st.", "a.m.", "p.m.", "inc.", "ltd.", "jr.", "sr.", "u.s.", "u.k."}


def _abbreviation(match: re.Match[str]) -> str:
    abbreviation = match.group(1).lower()
    words = _ABBREVIATION_LOOKUP[abbreviation]
    rest = match.string[match.end() :]
    # "... and so on etc. Then" ends a sentence: keep its full stop.
    if abbreviation in _SENTENCE_FINAL_ABBREVIATIONS and (not rest.strip() or re.match(r"\s+[A-Z]", rest)):
        words += "."
    return words


def _phone_number(match: re.Match[str]) -> str:
    groups = re.findall(r"\d+", match.group(0))
    return ", ".join(_digits(g) for g in groups)


def _money(match: re.Match[str]) -> str:
    symbol, amount, scale = match.group(1), match.group(2).replace(",", ""), match.group(3)
    one, many, sub_one, sub_many = _CURRENCIES[symbol]
    if scale:
        return f"{_cardinal(amount)} {scale} {many}"
    whole, _, cents = amount.partition(".")
    whole_n = int(whole) if whole else 0
    words = f"{number_to_words(whole_n)} {one if whole_n == 1 else many}"
    if cents:
        cents_n = int((cents + "0")[:2])
        if cents_n:
            cents_words = f"{number_to_words(cents_n)} {sub_one if cents_n == 1 else sub_many}"
            words = cents_words if whole_n == 0 else f"{words} and {cents_words}"
    return words


def _time(match: re.Match[str]) -> str:
    hour, minute, suffix = int(match.group(1)), int(match.group(2)), match.group(3)
    words = number_to_words(hour)
    if minute:
        words += (" oh " + _ONES[minute]) if minute < 10 else " " + number_to_words(minute)
    elif not suffix:
        words += " o'clock"
    if suffix:
        words += " " + " ".join(suffix.upper())
    return words


def _ordinal(match: re.Match[str]) -> str:
    return ordinal_to_words(int(match.group(1).replace(",", "")))


def _number(match: re.Match[str]) -> str:
    text = match.group(0)
    plain = text.replace(",", "")
    if "." not in plain and len(plain) == 4 and 1100 <= int(plain) <= 2099 and "," not in text:
        return year_to_words(int(plain))
    if plain.startswith("0") and len(plain) > 1 and "." not in plain:
        return _digits(plain)  # "007", zip codes: digit by digit
    return _cardinal(text)


def normalize_for_speech(text: str) -> str:
    """Rewrite text as plain spoken words for CSM: no markdown, emoji, digits or symbols."""
    text = unicodedata.normalize("NFKC", text)
    for pattern, replacement in _MARKDOWN_RULES:
        text = pattern.sub(replacement, text)
    text = _strip_emoji(text)
    # A line that ends without punctuation (header, list item) is still a sentence of its own.
    text = " ".join(line + "." if line[-1:].isalnum() else line for line in map(str.strip, text.splitlines()))
    text = text.replace("…", "...").replace("\u2019", "'").replace("\u2018", "'")
    text = text.replace("\u201c", '"').replace("\u201d", '"').replace("\u2014", ", ").replace("\u2013", " to ")
    text = _MARKER_RE.sub(" ", text)
    text = re.sub(r"\bSt\.(?=\s+[A-Z])", "Saint", text)
    text = _ABBREVIATION_RE.sub(_abbreviation, text)

    text = re.sub(r"([$€£])\s?(\d[\d,]*(?:\.\d+)?)" + _SCALE_WORDS, _money, text)
    text = re.sub(r"\b(\d{1,2}):(\d{2})(?:\s*([ap]m)\b)?(?![\w:])", _time, text, flags=re.I)
    text = re.sub(r"\b(\d{1,2})\s*([ap])m\b", lambda m: f"{m.group(1)} {m.group(2).upper()} M", text, flags=re.I)
    text = re.sub(r"(\d[\d,]*(?:\.\d+)?)\s?%", lambda m: f"{_cardinal(m.group(1))} percent", text)
    text = re.sub(r"\b(\d[\d,]*)(?:st|nd|rd|th)\b", _ordinal, text)
    text = re.sub(r"(?<!\w)(?:\(?\d{3}\)?[-.\s]+)?\d{3}-\d{4}\b", _phone_number, text)
    text = re.sub(r"(?<=\d)\s*-\s*(?=\d)", " to ", text)  # ranges: 3-5
    text = re.sub(r"(?<=[A-Za-z])(?=\d)|(?<=\d)(?=[A-Za-z])", " ", text)  # "221B", "Q3"
    text = re.sub(r"(?<![\w.])-(?=\d)", "minus ", text)
    text = re.sub(r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+", _number, text)

    for symbol, words in _SYMBOLS.items():
        text = text.replace(symbol, words)
    text = text.replace("*", " ").replace("_", " ").replace("`", " ").replace("|", " ").replace("\\", " ")
    text = _BRACKETS_RE.sub(", ", text)
    text = re.sub(r"\.{4,}", "...", text)
    text = re.sub(r"\s+([,.!?;:])", r"\1", text)  # no space before punctuation
    text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)  # collapse runs like ", ,"
    text = re.sub(r"([.!?])\s*,", r"\1", text)
    text = re.sub(r"[,;:]+\s*([.!?])", r"\1", text)
    text = re.sub(r"(^|[.!?]\s)\s*[,;:]\s*", r"\1", text)
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"^[,;:]\s*", "", text)
    text = re.sub(r"\s*[;:]$", ".", text)  # "Steps:" said as a sentence of its own
    text = re.sub(r"\s*,,+$", ",", text).strip()
    return text
