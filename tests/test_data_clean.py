"""Cleaning steps one by one: PII patterns (hits and near misses), filters, normalization, deduplication."""

from __future__ import annotations

import unicodedata

import pytest

from dozero.data.clean import (
    CleanConfig,
    CleanReport,
    Deduplicator,
    alpha_ratio,
    clean_document,
    duplicated_line_ratio,
)
from dozero.data.pii import luhn_ok, scrub_pii
from dozero.errors import DozeroError


def scrub(text):
    counts = {}
    return scrub_pii(text, counts), counts


@pytest.mark.parametrize(
    "text, expected, kind",
    [
        ("mail john.doe+news@mail.example.co.uk now", "mail <EMAIL> now", "email"),
        ("call +1 415 555 0132.", "call <PHONE>.", "phone"),
        ("call (415) 555-0132 today", "call <PHONE> today", "phone"),
        ("call 415-555-0132", "call <PHONE>", "phone"),
        ("ligue +55 11 91234-5678", "ligue <PHONE>", "phone"),
        ("ligue (11) 91234-5678", "ligue <PHONE>", "phone"),
        ("host 192.168.10.254 up", "host <IP_ADDRESS> up", "ip"),
        ("v6 2001:db8:85a3::8a2e:370:7334 up", "v6 <IP_ADDRESS> up", "ip"),
        ("link fe80::1ff:fe23:4567:890a", "link <IP_ADDRESS>", "ip"),
        ("visa 4111 1111 1111 1111 ok", "visa <CARD_NUMBER> ok", "card"),
        ("amex 3782-822463-10005", "amex <CARD_NUMBER>", "card"),
        ("plain 5555555555554444", "plain <CARD_NUMBER>", "card"),
    ],
)
def test_pii_is_replaced(text, expected, kind):
    out, counts = scrub(text)
    assert out == expected and counts == {kind: 1}


@pytest.mark.parametrize(
    "text",
    [
        "Python 3.11.7 was released on 2023-12-04 at 12:30:45.",
        "x = a[::2]; std::vector<int> v; print(1.2.3)",
        "the number 4111 1111 1111 1112 fails the Luhn check",
        "pi is 3.14159265358979, a million is 1,000,000, ISBN 978-3-16-148410-0",
        "versions 256.1.1.1 and 1.2.3.4.5 are not addresses",
        "price: $1234.56 for 12 items; id 20231204",
    ],
)
def test_near_misses_are_left_alone(text):
    out, counts = scrub(text)
    assert out == text and counts == {}


@pytest.mark.parametrize(
    "text, expected, counts",
    [
        ("Meu CPF é 123.456.789-09, confira.", "Meu CPF é <CPF>, confira.", {"cpf": 1}),
        ("Informe o CPF 12345678909.", "Informe o CPF <CPF>.", {"cpf": 1}),  # bare, right check digits
        ("CPF: 529982247-25 (titular)", "CPF: <CPF> (titular)", {"cpf": 1}),
        ("A empresa, CNPJ 11.222.333/0001-81, fica em São Paulo.", "A empresa, CNPJ <CNPJ>, fica em São Paulo.",
         {"cnpj": 1}),
        ("CNPJ 11222333000181; razão social Exemplo Ltda.", "CNPJ <CNPJ>; razão social Exemplo Ltda.", {"cnpj": 1}),
        ("Ligue para (11) 91234-5678 ou (21)3456-7890.", "Ligue para <PHONE> ou <PHONE>.", {"phone": 2}),
        ("Meu celular é 11 91234-5678, o fixo 3456-7890.", "Meu celular é <PHONE>, o fixo <PHONE>.", {"phone": 2}),
        ("WhatsApp: +55 11 91234-5678 (só mensagens)", "WhatsApp: <PHONE> (só mensagens)", {"phone": 1}),
        ("Sem DDD: 91234-5678.", "Sem DDD: <PHONE>.", {"phone": 1}),
        ("Cel. (11) 9 8765-4321 ou (011) 98765-4321.", "Cel. <PHONE> ou <PHONE>.", {"phone": 2}),
        ("Zap 98765 4321, tel 11 987654321, recado 9 8765-4321.", "Zap <PHONE>, tel <PHONE>, recado <PHONE>.",
         {"phone": 3}),
        ("Dúvidas? Escreva (email: ana@x.com.br).", "Dúvidas? Escreva (email: <EMAIL>).", {"email": 1}),
        ("Call me, ligue 555-123-4567, ok?", "Call me, ligue <PHONE>, ok?", {"phone": 1}),
        ("Telefone (555-123-4567) e ((415) 555-0132).", "Telefone (<PHONE>) e (<PHONE>).", {"phone": 2}),
        ("O servidor responde em 192.168.0.1.", "O servidor responde em <IP_ADDRESS>.", {"ip": 1}),
        ("Pague com o cartão 4111 1111 1111 1111.", "Pague com o cartão <CARD_NUMBER>.", {"card": 1}),
    ],
)  # fmt: skip
def test_brazilian_personal_data_in_running_text(text, expected, counts):
    assert scrub(text) == (expected, counts)


@pytest.mark.parametrize(
    "text",
    [
        "Custa R$ 1.234,56 à vista ou R$ 12.345.678,90 a prazo, em 2024.",
        "A reunião foi em 12/03/2024 (ou 12-03-2024), das 14:30 às 16:00.",
        "O número 12345678900 tem 11 dígitos, mas os verificadores estão errados.",
        "O código 11222333000180 tem 14 dígitos e o verificador errado.",
        "Vendeu 203.062.512 unidades; o estoque tem 10.000 peças e 1,5 kg.",
        "Entre 2000-2010 a população foi de 3000-4000 pessoas (ver páginas 3456-3489).",
        "ISBN 978-85-333-0227-3, ISBN 0-306-40615-2 e ISSN 2049-3630.",
        "CEP 01310-100, processo 0001234-56.2023.8.26.0100, agência 1234-5 conta 12345-6.",
        "De 1990-2000 a versão 1.2.3.4.5 rodou em 256.1.1.1.",
        "Foram 987654321 acessos e 12345678 visitas; o lote 9 1234 chegou com 34567890 itens.",
    ],
)
def test_brazilian_near_misses_are_left_alone(text):
    assert scrub(text) == (text, {})


def test_cpf_and_cnpj_check_digits():
    from dozero.data.pii import cnpj_ok, cpf_ok

    # Published examples: 529.982.247-25 and 11.222.333/0001-81 are valid; each last digit changed is not.
    assert cpf_ok("52998224725") and cpf_ok("12345678909") and not cpf_ok("52998224724")
    assert not cpf_ok("11111111111")  # passes the arithmetic, is never issued
    assert cnpj_ok("11222333000181") and not cnpj_ok("11222333000182") and not cnpj_ok("00000000000000")


def test_luhn():
    assert luhn_ok("4111111111111111") and luhn_ok("79927398713")
    assert not luhn_ok("4111111111111112") and not luhn_ok("79927398710")


def test_filters_and_ratios():
    assert alpha_ratio("abcd 1234") == 0.5
    assert duplicated_line_ratio("aaaa\nbb\naaaa\n\n") == pytest.approx(4 / 10)  # repeated line's chars / all chars
    cfg = CleanConfig(min_chars=10)
    assert clean_document("short", cfg).reason == "too_short"
    assert clean_document("#### 1234 5678 %%%% 9999 ---- ****", cfg).reason == "low_alpha_ratio"
    assert clean_document("same line here\n" * 5 + "another one", cfg).reason == "duplicated_lines"
    assert clean_document("x" * 300, cfg).reason == "empty_after_cleaning"  # its one line is a junk "word"
    ok = clean_document("A good line of text.\n" + "Z" * 300 + "\nAnother good line.", cfg)
    assert ok.reason is None and ok.text == "A good line of text.\nAnother good line." and ok.long_word_lines == 1


def test_normalization_and_master_switch():
    decomposed = "Cafe\u0301 au lait, cre\u0300me bru\u0302le\u0301e, and more words here."
    result = clean_document(decomposed + "\r\nsecond line", CleanConfig())
    assert result.normalized and result.text == unicodedata.normalize("NFC", decomposed) + "\nsecond line"
    assert clean_document(decomposed, CleanConfig(normalize="none")).text == decomposed
    raw = "tiny junk@example.com"
    assert clean_document(raw, CleanConfig(clean=False)).text == raw  # --no-clean: untouched
    with pytest.raises(DozeroError, match="--normalize 'NFX'"):
        CleanConfig(normalize="NFX")


def _words(seed, n=200):
    import random

    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(n)]


def test_exact_and_near_duplicates():
    cfg = CleanConfig(min_chars=0)
    dedup = Deduplicator(cfg)
    base = _words(1)
    near = list(base)
    near[50], near[150] = "changed", "words"  # ~10 of 196 shingles differ: Jaccard ~0.9
    docs = {
        "a": " ".join(base),
        "b": " ".join(_words(2)),
        "a_spacing": "  ".join(base).upper(),  # same text up to case and whitespace: exact duplicate
        "a_near": " ".join(near),
        "c": " ".join(_words(3)),
    }
    verdicts = {k: dedup.is_duplicate(clean_document(v, cfg)) for k, v in docs.items()}
    assert verdicts == {"a": None, "b": None, "a_spacing": "exact_duplicate", "a_near": "near_duplicate", "c": None}


def test_report_counts_and_summary():
    cfg = CleanConfig(min_chars=10)
    report = CleanReport(cfg)
    for text in ["write to me@example.org please, friend", "tiny", "fine text that stays as it is"]:
        report.add("src", text, clean_document(text, cfg))
    d = report.to_dict()
    assert d["documents_in"] == 3 and d["documents_kept"] == 2
    assert d["steps"]["pii"]["replaced"] == {"email": 1}
    assert "me@example.org" not in str(d)  # examples show the placeholder, never the personal data
    assert d["steps"]["quality_filter"]["removed"]["too_short"] == 1
    assert "1 too short" in report.summary() and "1 email" in report.summary()


def test_minhash_in_blocks_equals_minhash_in_one_go(monkeypatch):
    from dozero.data import clean

    texts = ["", "one", "a b c d", "a b c d e", " ".join(_words(4, 3000)), "\n\t ".join(_words(5, 500)).upper()]
    whole = [clean.minhash_signature(t) for t in texts]
    monkeypatch.setattr(clean, "MINHASH_BLOCK_CHARS", 40)  # blocks of a few words: shingles span the cuts
    monkeypatch.setattr(clean, "MINHASH_BATCH", 7)
    for text, expected in zip(texts, whole, strict=True):
        assert (clean.minhash_signature(text) == expected).all()
    assert (whole[1] != whole[0]).any() and (whole[4] != whole[5]).any()


MEMORY_CHILD = """
import resource, sys
import numpy as np
from dozero.data.clean import CleanConfig, clean_document
rng = np.random.default_rng(0)
vocab = np.array(["".join(chr(97 + c) for c in rng.integers(0, 26, rng.integers(2, 9))) for _ in range(5000)])
text = " ".join(vocab[rng.integers(0, len(vocab), 500_000)])  # ~3 MB, one document, one line
clean_document("warm up the imports " * 10, CleanConfig(min_chars=0))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = clean_document(text, CleanConfig())
assert result.reason is None and result.minhash is not None
print(len(text), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_one_huge_document_costs_bounded_memory():
    """MinHash of a 3 MB single-line document took ~550 MB more (peak RSS) when all shingles were hashed in one
    batch (datasketch makes a (shingles, 128) array); in blocks it needs tens of MB whatever the size."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", MEMORY_CHILD], capture_output=True, text=True, check=True)
    chars, extra_mb = map(int, run.stdout.split())
    assert chars > 2_500_000 and extra_mb < 150, run.stdout
