"""Validators: what makes a regex match a real card number, IBAN, phone number
or secret. Pure functions over the matched text."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of a string of ASCII digits."""
    total = 0
    for k, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if k % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


# Official IBAN lengths of the common countries; others only need 15..34.
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22,
    "BH": 22, "BR": 29, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18,
    "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22,
    "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LI": 21,
    "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27,
    "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25,
    "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SE": 24, "SI": 19, "SK": 24, "SM": 27,
    "TN": 24, "TR": 26, "UA": 29, "VG": 24, "XK": 20,
}  # fmt: skip


def iban_ok(compact: str) -> bool:
    """Length (per country when known) and the ISO 7064 mod-97 check of an
    IBAN without spaces."""
    if not 15 <= len(compact) <= 34:
        return False
    expected = _IBAN_LENGTHS.get(compact[:2])
    if expected is not None and len(compact) != expected:
        return False
    moved = compact[4:] + compact[:4]
    number = "".join(str(int(ch, 36)) for ch in moved)
    return int(number) % 97 == 1


def _ends_at_separators(s: str, seps: str) -> Iterable[int]:
    """The whole of ``s``, then each prefix that ends just before a separator,
    longest first: a valid number followed by unrelated digit groups."""
    yield len(s)
    for k in range(len(s) - 1, 0, -1):
        if s[k] in seps:
            yield k


#: what may separate the digit groups of a card number
CARD_SEPARATORS = " -\u00a0\u202f"
_NOT_DIGIT = re.compile(r"[^0-9]")


def card_span(m: re.Match[str]) -> tuple[int, int] | None:
    s = m.group()
    for end in _ends_at_separators(s, CARD_SEPARATORS):
        digits = _NOT_DIGIT.sub("", s[:end])
        # 0000 0000 0000 0000 passes Luhn but is no card
        repeated = digits.count(digits[0]) == len(digits)
        if 13 <= len(digits) <= 19 and not repeated and luhn_ok(digits):
            return m.start(), m.start() + end
    return None


def iban_span(m: re.Match[str]) -> tuple[int, int] | None:
    s = m.group()
    for end in _ends_at_separators(s, " "):
        if iban_ok(s[:end].replace(" ", "")):
            return m.start(), m.start() + end
    return None


_GROUP_SPLIT = re.compile(r"[ .\-]")


def phone_span(m: re.Match[str]) -> tuple[int, int] | None:
    s = m.group()
    digits = sum(ch.isdigit() for ch in s)
    if s[0] == "+":
        return (m.start(), m.end()) if 8 <= digits <= 15 else None
    if not 9 <= digits <= 12:
        return None
    if s[0] != "(":
        groups = _GROUP_SPLIT.split(s)
        # 1 234 567 890 or 10.000.000 is an amount, 94105-1234 a ZIP+4 code.
        if s[0] != "0" and len(groups[0]) <= 3 and all(len(g) == 3 for g in groups[1:]):
            return None
        if len(groups) == 2 and len(groups[0]) == 5 and len(groups[1]) == 4:
            return None
    return m.start(), m.end()


def shannon_entropy(s: str) -> float:
    """Bits per character of ``s``."""
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values()) if n else 0.0


def looks_secret(value: str) -> bool:
    """A generic credential value: at least 16 characters, letters and digits,
    and at least 3 bits of entropy per character in its first 32 characters
    (only the first 32 count, so that the verdict is final once 32 are seen)."""
    if len(value) < 16:
        return False
    head = value[:32]
    has_digit = any(ch.isdigit() for ch in head)
    has_alpha = any(ch.isalpha() for ch in head)
    return has_digit and has_alpha and shannon_entropy(head) >= 3.0


def secret_span(m: re.Match[str]) -> tuple[int, int] | None:
    return (m.start("secret"), m.end()) if looks_secret(m.group("secret")) else None
