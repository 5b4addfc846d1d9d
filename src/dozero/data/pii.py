"""Personal data found in text and replaced by placeholders: e-mails, phones, IP addresses, card numbers,
Brazilian CPF and CNPJ numbers. Heuristics (regular expressions plus check digits), tuned on the hits and
near misses in tests/test_data_clean.py; `clean.clean_document` calls `scrub_pii` on every kept document.

    counts = {}
    scrub_pii("Ligue (11) 91234-5678 ou escreva para ana@x.com.br.", counts)
    # -> "Ligue <PHONE> ou escreva para <EMAIL>."; counts == {"phone": 1, "email": 1}
"""

from __future__ import annotations

import ipaddress

import regex

# Each pattern ends with "(?!...|[.,]\d)" rather than "(?![.,])": personal data is often followed by the
# period or comma of the sentence ("ligue 555-123-4567," / "servidor 10.0.0.1."), while a digit after the
# dot or comma means a longer number ("1.234,56"), which is left alone.
EMAIL = regex.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}\b")
IPV4 = regex.compile(
    r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\w|\.\d)"
)
# Candidates only; `ipaddress` decides (so clock times "12:30:45" and C++ "std::vector" stay).
IPV6 = regex.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
# 13-19 digits, optionally in groups separated by one space or dash; replaced only if the Luhn check passes.
CARD = regex.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-]|[.,]\d)")
# Brazilian taxpayer numbers: CPF (people) 000.000.000-00, CNPJ (companies) 00.000.000/0000-00. Written
# with their punctuation they are always replaced; as bare runs of 11 / 14 digits only if their two check
# digits are right (1 chance in 100 for an arbitrary number), so ordinary long numbers stay.
CPF = regex.compile(r"(?<![\w./-])(?:\d{3}\.\d{3}\.\d{3}-\d{2}|\d{9}-\d{2}|(?P<bare>\d{11}))(?![\w/-]|[.,]\d)")
CNPJ = regex.compile(r"(?<![\w./-])(?:\d{2}\.\d{3}\.\d{3}/\d{4}-\d{2}|(?P<bare>\d{14}))(?![\w/-]|[.,]\d)")
# Shapes chosen so that years, prices and version numbers are left alone: international "+1 415 555 0132" /
# "+55 11 91234-5678", North American "(415) 555-0132" / "415-555-0132".
PHONE = regex.compile(
    r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,5}\)?){2,5}(?!\w)"
    r"|(?<![\w.-])(?:\(\d{3}\)\s?|\d{3}[.-])\d{3}[.-]\d{4}(?![\w-]|[.,]\d)"
)
# Brazilian: mobiles (9 + 8 digits) "(11) 91234-5678", "(11)912345678", "(011) 9 1234-5678",
# "11 91234-5678", "11 912345678", "91234-5678", "91234 5678", "9 1234-5678"; landlines (8 digits)
# "(11) 3456-7890", "11 3456-7890", "3456-7890". Without parentheses a landline needs its dash and a mobile
# without an area code a separator, so that runs of digits stay. Four digits, dash, four digits is also how
# ranges are written ("2000-2010", "3000-4000"), so `_br_phone_ok` leaves year ranges and round ranges alone.
_MOBILE, _LANDLINE = r"9 ?\d{4}[- ]?\d{4}", r"[2-9]\d{3}-?\d{4}"
BR_PHONE = regex.compile(
    r"(?=[(\d])(?<![\w.,/+-])(?<!ISSN )"  # the lookahead first lets `regex` skip letters quickly: 6x faster
    rf"(?:\(0?[1-9][1-9]\)\s?(?:{_MOBILE}|{_LANDLINE})"  # area code in parentheses, with the trunk 0 or not
    rf"|0?[1-9][1-9] (?:{_MOBILE}|[2-9]\d{{3}}-\d{{4}})"  # area code, a space
    r"|9 ?\d{4}[- ]\d{4}|[2-9]\d{3}-\d{4})"  # no area code
    r"(?![\w-]|[.,]\d)"
)
_YEAR = regex.compile(r"(?:19|20)\d\d")
PLACEHOLDERS = {"email": "<EMAIL>", "cpf": "<CPF>", "cnpj": "<CNPJ>", "card": "<CARD_NUMBER>", "phone": "<PHONE>",
                "ip": "<IP_ADDRESS>"}  # fmt: skip


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum that every payment card number satisfies (ISO/IEC 7812)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _check_digit(digits: str, weights: list[int]) -> int:
    """Mod-11 check digit of the CPF and CNPJ (Receita Federal): 11 - sum % 11, or 0 when that is 10 or 11."""
    rest = sum(int(d) * w for d, w in zip(digits, weights, strict=True)) % 11
    return 0 if rest < 2 else 11 - rest


def cpf_ok(digits: str) -> bool:
    """11 digits whose last two are the CPF check digits (weights 10..2, then 11..2)."""
    if len(digits) != 11 or len(set(digits)) == 1:  # 000.000.000-00, 111...: pass the check, are never issued
        return False
    first = _check_digit(digits[:9], list(range(10, 1, -1)))
    return digits[9:] == f"{first}{_check_digit(digits[:9] + str(first), list(range(11, 1, -1)))}"


def cnpj_ok(digits: str) -> bool:
    """14 digits whose last two are the CNPJ check digits (weights 5..2 9..2, then 6..2 9..2)."""
    if len(digits) != 14 or len(set(digits)) == 1:
        return False
    weights = [6, 5, 4, 3, 2, 9, 8, 7, 6, 5, 4, 3, 2]
    first = _check_digit(digits[:12], weights[1:])
    return digits[12:] == f"{first}{_check_digit(digits[:12] + str(first), weights)}"


def _br_phone_ok(s: str) -> bool:
    """False for ranges written like a landline without area code: years "2000-2010", round numbers
    "3000-4000", pages "3456-3489" (increasing by less than 1,000: 5% of phone numbers, left in the text)."""
    if len(s) != 9 or s[4] != "-":  # with an area code, or a mobile's 5 + 4 digits: a phone
        return True
    left, right = s[:4], s[5:]
    if _YEAR.fullmatch(left) and _YEAR.fullmatch(right):
        return False
    return not ((left.endswith("0") and right.endswith("0")) or 0 < int(right) - int(left) < 1000)


def _valid_ipv6(s: str) -> bool:
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return sum(c.isalnum() for c in s) >= 2  # "::" alone (Python slices) is an address, not PII


def scrub_pii(text: str, counts: dict[str, int]) -> str:
    """Replace personal data by placeholders, adding the number of replacements per kind to `counts`."""

    def sub(pattern, kind, text, check=None):
        def repl(m):
            if check is not None and not check(m.group()):
                return m.group()
            counts[kind] = counts.get(kind, 0) + 1
            return PLACEHOLDERS[kind]

        return pattern.sub(repl, text)

    # E-mails first (their domain may hold digits); the checked numbers (CNPJ, CPF, cards) before phones, which
    # a long number could also look like.
    if "@" in text:
        text = sub(EMAIL, "email", text)
    digits_only = str.maketrans("", "", " .-/")
    text = sub(CNPJ, "cnpj", text, lambda s: not s.isdigit() or cnpj_ok(s))
    text = sub(CPF, "cpf", text, lambda s: not s.isdigit() or cpf_ok(s))
    text = sub(CARD, "card", text, lambda s: luhn_ok(s.translate(digits_only)))
    text = sub(PHONE, "phone", text, lambda s: 8 <= sum(c.isdigit() for c in s) <= 15)
    text = sub(BR_PHONE, "phone", text, _br_phone_ok)
    text = sub(IPV4, "ip", text)
    if ":" in text:
        text = sub(IPV6, "ip", text, _valid_ipv6)
    return text
