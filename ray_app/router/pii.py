"""Detect personal data in text that could leave the machine: emails, phone numbers, payment cards, IBANs.

The router uses a hit to keep a request on local targets, so a false negative leaks data to a cloud
provider while a false positive only costs a cheaper route. Patterns are therefore broad, and numbers
are confirmed with their own check digits (Luhn for cards, mod-97 for IBANs) to keep order ids and
timestamps from tripping them. Findings carry the kind and span only: the value is never stored, so it
cannot end up in a log line or a reason string.

Two properties hold against hostile input:

- **Evasion**: text is normalised first (NFKC, every Unicode digit to ASCII, Unicode spaces and dashes
  to ``' '`` and ``'-'``, zero-width characters and soft hyphens removed), and numbers may be grouped
  with spaces, dashes, dots, underscores or slashes; IBANs are matched in any case.
- **Linear time**: no regular expression here has a quantifier inside a quantifier. Digit groups are
  found with ``\\d+`` and joined into runs by a single pass over the gaps between them; emails grow
  outward from each ``@``; IBANs from each two-letters-two-digits anchor, at most 34 characters. Every
  character is looked at a bounded number of times whatever the input (``tests/unit/test_router_pii.py``
  checks the patterns' structure).
"""

from __future__ import annotations

import re
import sys
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["PATTERNS", "PII_KINDS", "PIIFinding", "PIIKind", "find_pii", "iban_valid", "luhn_valid", "normalise",
           "request_strings", "scan"]

PIIKind = Literal["iban", "card", "email", "phone"]
# Checked in this order; a later kind overlapping an earlier finding is dropped (a card number also
# looks like a long phone number).
PII_KINDS: tuple[PIIKind, ...] = ("iban", "card", "email", "phone")


@dataclass(frozen=True)
class PIIFinding:
    kind: PIIKind
    start: int  # in the normalised text
    end: int


def _translation() -> dict[int, str | None]:
    table: dict[int, str | None] = {}
    for code in range(sys.maxunicode + 1):
        ch = chr(code)
        category = unicodedata.category(ch)
        if category == "Nd" and code > 127:
            table[code] = str(unicodedata.digit(ch))
        elif category == "Zs" and ch != " ":
            table[code] = " "
        elif category == "Pd" and ch != "-":
            table[code] = "-"
    for ch in "\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e":  # invisible: joiners, BOM, soft hyphen
        table[ord(ch)] = None
    table[ord("\u2212")] = "-"  # minus sign
    for ch in "\t\u00a0\u202f\u2007":
        table[ord(ch)] = " "
    return table


_TRANSLATE = _translation()


def normalise(text: str) -> str:
    """The text as the scanners see it: look-alike characters folded to the ASCII ones patterns use."""
    if text.isascii():
        return text.replace("\t", " ")
    return unicodedata.normalize("NFKC", text).translate(_TRANSLATE)


# -- the patterns: each a flat character class or a fixed sequence, never a quantifier inside another --

_DIGITS = re.compile(r"\d+", re.ASCII)
_EMAIL_LOCAL_REVERSED = re.compile(r"[A-Za-z0-9._%+-]+")  # matched on the reversed text, leftwards from @
_EMAIL_DOMAIN = re.compile(r"[A-Za-z0-9.-]+")
_IBAN_ANCHOR = re.compile(r"[A-Za-z]{2}[0-9]{2}")
PATTERNS = (_DIGITS, _EMAIL_LOCAL_REVERSED, _EMAIL_DOMAIN, _IBAN_ANCHOR)

_GAP_CHARS = frozenset(" -._/()")
_MAX_GAP = 3  # "4111 - 1111" and "(555) 123" still join; words between numbers do not
_IBAN_SEPARATORS = frozenset(" -.")
_IBAN_MAX = 34

# Registered IBAN lengths for common countries; others are accepted at any length from 15 to 34.
_IBAN_LENGTHS = {
    "AT": 20, "BE": 16, "BG": 22, "CH": 21, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "EE": 20, "ES": 24,
    "FI": 18, "FR": 27, "GB": 22, "GR": 27, "HR": 21, "HU": 28, "IE": 22, "IS": 26, "IT": 27, "LI": 21,
    "LT": 20, "LU": 20, "LV": 21, "MT": 31, "NL": 18, "NO": 15, "PL": 28, "PT": 25, "RO": 24, "SE": 24,
    "SI": 19, "SK": 24, "TR": 26,
}


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_valid(iban: str) -> bool:
    """ISO 13616 check: move the first four characters to the end, letters -> 10..35, mod 97 == 1."""
    iban = "".join(ch for ch in iban if ch not in _IBAN_SEPARATORS).upper()
    if not (15 <= len(iban) <= _IBAN_MAX and iban[:2].isalpha() and iban[2:4].isdigit() and iban.isalnum()
            and iban.isascii()):
        return False
    expected = _IBAN_LENGTHS.get(iban[:2])
    if expected is not None and len(iban) != expected:
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


# -- digit runs: cards and phones ---------------------------------------------------------------


@dataclass
class _Group:
    start: int
    end: int
    gap: str  # the separators before this group ("" for the first of a run)

    @property
    def size(self) -> int:
        return self.end - self.start


def _runs(text: str) -> Iterator[list[_Group]]:
    """Digit groups joined by short runs of separators; one pass over ``\\d+`` matches."""
    run: list[_Group] = []
    for m in _DIGITS.finditer(text):
        if run:
            gap = text[run[-1].end:m.start()]
            if len(gap) <= _MAX_GAP and all(ch in _GAP_CHARS for ch in gap):
                run.append(_Group(m.start(), m.end(), gap))
                continue
            yield run
        run = [_Group(m.start(), m.end(), "")]
    if run:
        yield run


def _char(text: str, i: int) -> str:
    return text[i] if 0 <= i < len(text) else ""


def _in_decimal(text: str, start: int, end: int) -> bool:
    """A lone group that is the fraction or integer part of a decimal number (3.14159...)."""
    before, after = _char(text, start - 1), _char(text, end)
    return (before in (".", ",") and _char(text, start - 2).isdigit()) or (
        after in (".", ",") and _char(text, end + 1).isdigit())


def _card_spans(text: str, run: list[_Group]) -> list[tuple[int, int]]:
    if _char(text, run[0].start - 1).isalpha():
        return []  # digits glued to letters are a code (an IBAN failing its check, a part number)
    spans = []
    i = 0
    while i < len(run):
        found = None
        digits = 0
        for j in range(i, len(run)):
            if j > i and (run[j].size > 6 or run[i].size > 6 or run[j].gap != run[i + 1].gap
                          or run[j].gap[:1] in ("(", ")", "/")):
                break  # formatted cards use one separator between groups of at most 6 digits
            digits += run[j].size
            if digits > 19:
                break
            if digits >= 13:
                start, end = run[i].start, run[j].end
                lone = i == j
                if lone and (_char(text, start - 1) in ("+", "-") or _in_decimal(text, start, end)):
                    continue
                number = "".join(text[g.start:g.end] for g in run[i:j + 1])
                if luhn_valid(number):
                    found = (start, end, j)
        if found:
            spans.append(found[:2])
            i = found[2] + 1
        else:
            i += 1
    return spans


def _international(text: str, run: list[_Group]) -> tuple[int, int] | None:
    """+CC then groups: 8 to 15 digits in all (E.164), e.g. +44 20 7946 0958, +1 (555) 123-4567."""
    first = run[0]
    lead = text[max(first.start - 2, 0):first.start]
    if "+" not in lead:
        return None
    plus = first.start - len(lead) + lead.index("+")
    if text[plus + 1:first.start] not in ("", "(", " ") or _char(text, plus - 1).isalnum() or _char(text, plus - 1) == "+":
        return None
    digits, last = 0, None
    for g in run:
        if "/" in g.gap or digits + g.size > 15:
            break
        digits += g.size
        last = g
    return (plus, last.end) if last is not None and digits >= 8 else None


def _north_american(text: str, run: list[_Group]) -> tuple[int, int] | None:
    """(555) 123-4567, 555-123-4567, 555.123.4567: groups of 3, 3 and 4 with separators."""
    for i in range(len(run) - 2):
        a, b, c = run[i], run[i + 1], run[i + 2]
        if (a.size, b.size, c.size) != (3, 3, 4) or (i + 3 < len(run) and len(run[i + 3].gap) == 0):
            continue
        parenthesised = _char(text, a.start - 1) == "(" and b.gap in (")", ") ")
        if not parenthesised and (len(b.gap) != 1 or b.gap not in "-. _"):
            continue
        if len(c.gap) != 1 or c.gap not in "-. _":
            continue
        start = a.start - 1 if parenthesised else a.start
        before = _char(text, start - 1)
        if before.isalnum() or before in ("(", "_"):
            continue
        return start, c.end
    return None


def _national(text: str, run: list[_Group]) -> tuple[int, int] | None:
    """With trunk prefix 0: 020 7946 0958, 01 23 45 67 89, 07700900123 (9 to 12 digits)."""
    first = run[0]
    before = _char(text, first.start - 1)
    if text[first.start] != "0" or before.isalnum() or before in (".", ",", "+", "_"):
        return None
    digits, last = 0, None
    for n, g in enumerate(run):
        if n and (g.gap not in (" ", "-") or not 2 <= g.size <= 4 or first.size > 5):
            break
        if digits + g.size > 12:
            break
        digits += g.size
        last = g
    if last is None or not 9 <= digits <= 12:
        return None
    if _char(text, last.end) in (".", ",") and _char(text, last.end + 1).isdigit():
        return None
    return first.start, last.end


def _phone_spans(text: str, run: list[_Group]) -> list[tuple[int, int]]:
    return [span for finder in (_international, _north_american, _national) if (span := finder(text, run))]


# -- emails and IBANs ---------------------------------------------------------------------------


def _email_spans(text: str) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    reversed_text: str | None = None
    at = text.find("@")
    while at != -1:
        if reversed_text is None:
            reversed_text = text[::-1]
        local = _EMAIL_LOCAL_REVERSED.match(reversed_text, len(text) - at)
        domain = _EMAIL_DOMAIN.match(text, at + 1)
        if local and domain:
            host = domain.group().rstrip(".-")
            labels = host.split(".")
            if len(labels) >= 2 and all(labels) and len(labels[-1]) >= 2 and labels[-1].isalpha():
                spans.append((at - len(local.group()), at + 1 + len(host)))
        at = text.find("@", at + 1)
    return spans


def _iban_spans(text: str) -> list[tuple[int, int]]:
    spans = []
    for m in _IBAN_ANCHOR.finditer(text):
        if _char(text, m.start() - 1).isalnum():
            continue
        positions = list(range(m.start(), m.end()))
        i = m.end()
        while len(positions) < _IBAN_MAX and i < len(text):
            ch = text[i]
            if ch.isascii() and ch.isalnum():
                positions.append(i)
            elif not (ch in _IBAN_SEPARATORS and _char(text, i + 1).isascii() and _char(text, i + 1).isalnum()):
                break
            i += 1
        compact = "".join(text[p] for p in positions).upper()
        # the scan can swallow a following word ("... 3000 AND"): take the longest valid prefix
        for length in range(len(compact), 14, -1):
            if iban_valid(compact[:length]):
                spans.append((m.start(), positions[length - 1] + 1))
                break
    return spans


def find_pii(text: str, kinds: tuple[PIIKind, ...] = PII_KINDS) -> list[PIIFinding]:
    """Every PII finding in the normalised ``text``, ordered by position; overlapping findings keep the
    first kind (spans index the normalised text, which equals ``text`` when it is plain ASCII)."""
    text = normalise(text)
    found: dict[PIIKind, list[tuple[int, int]]] = {k: [] for k in PII_KINDS}
    if "iban" in kinds:
        found["iban"] = _iban_spans(text)
    if "email" in kinds and "@" in text:
        found["email"] = _email_spans(text)
    if "card" in kinds or "phone" in kinds:
        for run in _runs(text):
            if "card" in kinds:
                found["card"] += _card_spans(text, run)
            if "phone" in kinds:
                found["phone"] += _phone_spans(text, run)
    findings: list[PIIFinding] = []
    for kind in PII_KINDS:
        for start, end in found[kind]:
            if not any(start < f.end and f.start < end for f in findings):
                findings.append(PIIFinding(kind, start, end))
    return sorted(findings, key=lambda f: f.start)


def request_strings(value: Any) -> Iterator[str]:
    """Every string in a request body (message contents of every part type, tool definitions and
    calls, names, extra fields): all of it would reach a cloud target."""
    stack = [value]
    while stack:  # depth first, in document order, without recursion (nesting depth is the client's)
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed(item))


_ANY_DIGIT = re.compile(r"\d")  # Unicode digits too: they are folded to ASCII before the scan


def scan(texts: Iterable[str]) -> frozenset[PIIKind]:
    """The PII kinds found in any of ``texts``."""
    kinds: set[PIIKind] = set()
    for text in texts:
        # every kind needs a digit or an @ (after folding, which only non-ASCII text can need)
        if _ANY_DIGIT.search(text) or "@" in text or not text.isascii():
            kinds.update(f.kind for f in find_pii(text))
    return frozenset(kinds)
