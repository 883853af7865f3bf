"""PII detection: a table of true and false positives, with the check digits doing their job."""

from __future__ import annotations

import pytest

from ray_app.router.pii import find_pii, iban_valid, luhn_valid

CASES = [
    # emails
    ("write to john.doe+tag@example.co.uk today", [("email", "john.doe+tag@example.co.uk")]),
    ("the @decorator syntax and user@localhost", []),
    # payment cards: Luhn-valid, 13-19 digits, spaces/dashes allowed
    ("card 4111 1111 1111 1111, exp 12/27", [("card", "4111 1111 1111 1111")]),
    ("card 4111-1111-1111-1111.", [("card", "4111-1111-1111-1111")]),
    ("amex 378282246310005", [("card", "378282246310005")]),
    ("16 digits failing Luhn: 4111111111111112", []),
    ("order id 1234567812345678", []),
    ("pi = 3.14159265358979323", []),
    # IBANs: mod-97 checked, grouped or not, trailing words not swallowed
    ("IBAN DE89 3704 0044 0532 0130 00 and more", [("iban", "DE89 3704 0044 0532 0130 00")]),
    ("pay GB82WEST12345698765432 now", [("iban", "GB82WEST12345698765432")]),
    ("wrong check digit DE88 3704 0044 0532 0130 00", []),
    ("one digit off DE89 3704 0044 0532 0130 01", []),
    # phone numbers: international and common national formats
    ("call +44 20 7946 0958", [("phone", "+44 20 7946 0958")]),
    ("call +1 (555) 123-4567", [("phone", "+1 (555) 123-4567")]),
    ("whatsapp +4915112345678", [("phone", "+4915112345678")]),
    ("office (555) 123-4567", [("phone", "(555) 123-4567")]),
    ("office 555.123.4567", [("phone", "555.123.4567")]),
    ("London 020 7946 0958", [("phone", "020 7946 0958")]),
    ("Paris 01 23 45 67 89", [("phone", "01 23 45 67 89")]),
    ("mobile 07700900123", [("phone", "07700900123")]),
    # things that only look like numbers people care about
    ("released in 2024", []),
    ("from 1999-2024", []),
    ("on 2024-05-01 at 12:30", []),
    ("order 12345, room 101", []),
    ("python 3.10.4 on 192.168.1.1", []),
    ("years 2020 2021 2022 2023", []),
    ("ISBN 978-3-16-148410-0", []),
    ("ratio 0.123456789", []),
    ("5+3=8", []),
]


@pytest.mark.parametrize("text, expected", CASES)
def test_find_pii(text, expected):
    assert [(f.kind, text[f.start:f.end]) for f in find_pii(text)] == expected


def test_several_kinds_in_one_text_are_ordered_by_position():
    text = "mail a@b.io, card 4111 1111 1111 1111, phone +44 20 7946 0958"
    assert [f.kind for f in find_pii(text)] == ["email", "card", "phone"]


def test_kinds_can_be_restricted():
    assert find_pii("a@b.io +44 20 7946 0958", kinds=("phone",))[0].kind == "phone"
    assert len(find_pii("a@b.io +44 20 7946 0958", kinds=("phone",))) == 1


def test_findings_never_hold_the_value():
    finding = find_pii("card 4111 1111 1111 1111")[0]
    assert "4111" not in repr(finding)


@pytest.mark.parametrize("digits, valid", [("4111111111111111", True), ("4111111111111112", False),
                                           ("79927398713", True), ("79927398710", False)])
def test_luhn(digits, valid):
    assert luhn_valid(digits) is valid


@pytest.mark.parametrize("iban, valid", [("DE89370400440532013000", True), ("de89 3704 0044 0532 0130 00", True),
                                         ("DE8937040044053201300", False),  # one character short for DE
                                         ("FR1420041010050500013M02606", True), ("FR1420041010050500013M02607", False)])
def test_iban(iban, valid):
    assert iban_valid(iban) is valid


EVASIONS = [
    ("card 4111\u00a01111\u00a01111\u00a01111", "card"),  # no-break spaces
    ("card 4111\u20091111\u20091111\u20091111", "card"),  # thin spaces
    ("card 4111\u20131111\u20131111\u20131111", "card"),  # en dashes
    ("card 4111.1111.1111.1111", "card"),
    ("card 4111_1111_1111_1111", "card"),
    ("card 4111\u200b1111\u200b1111\u200b1111", "card"),  # zero-width spaces
    ("card \uff14\uff11\uff11\uff11 \uff11\uff11\uff11\uff11 \uff11\uff11\uff11\uff11 \uff11\uff11\uff11\uff11", "card"),
    ("card \u0664\u0661\u0661\u0661 \u0661\u0661\u0661\u0661 \u0661\u0661\u0661\u0661 \u0661\u0661\u0661\u0661", "card"),
    ("call +44\u00a020\u00a07946\u00a00958", "phone"),
    ("call +44.20.7946.0958", "phone"),
    ("call +44_20_7946_0958", "phone"),
    ("office (555)\u00a0123\u20134567", "phone"),
    ("iban de89 3704 0044 0532 0130 00", "iban"),
    ("iban De89-3704-0044-0532-0130-00", "iban"),
    ("mail john.doe\uff20example.com", "email"),
]


@pytest.mark.parametrize("text, kind", EVASIONS)
def test_lookalike_characters_and_separators_do_not_hide_pii(text, kind):
    assert [f.kind for f in find_pii(text)] == [kind]


def _nested_repeats(parsed) -> list[str]:
    """Repeats with a repeat inside them in a parsed pattern (what makes a regex backtrack exponentially)."""
    import re._constants as c

    repeats = (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT)

    def walk(items, inside: bool) -> list[str]:
        found = []
        for op, av in items:
            if op in repeats:
                if inside:
                    found.append(str(op))
                found += walk(av[2], True)
            elif op in (c.SUBPATTERN, c.ATOMIC_GROUP):
                found += walk(av[-1], inside)
            elif op == c.BRANCH:
                for branch in av[1]:
                    found += walk(branch, inside)
        return found

    return walk(parsed, False)


def test_no_pattern_has_a_quantifier_inside_a_quantifier():
    import re._parser as parser

    from ray_app.router.pii import PATTERNS

    assert _nested_repeats(parser.parse(r"(?:a+)+")) == ["MAX_REPEAT"]  # the check itself works
    for pattern in PATTERNS:
        assert _nested_repeats(parser.parse(pattern.pattern)) == [], pattern.pattern


def test_the_backtracking_input_of_the_old_phone_pattern_is_scanned_and_clean():
    # 390 KB of "+1111...": made the old international-phone regex backtrack for seconds
    text = (" +" + "1" * 28) * 13_000
    assert find_pii(text) == []
    assert [f.kind for f in find_pii(text + " call +44 20 7946 0958")] == ["phone"]


def test_every_string_of_a_request_is_scanned():
    from ray_app.router.pii import request_strings, scan

    request = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                         {"type": "input_text", "text": "card 4111 1111 1111 1111"}]}],
               "tools": [{"type": "function", "function": {"name": "f", "description": "mail a@b.io"}}],
               "metadata": {"note": "+44 20 7946 0958"}}
    assert scan(request_strings(request)) == {"card", "email", "phone"}
