"""PII masking (app/masking.py): every identifier type is replaced by its placeholder, look-alikes are left alone,
and the submission, tenant and deployment defaults apply in that order."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.config import Settings
from app.masking import Masker

MASKER = Masker(phone_regions=("US", "DE"))


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("write to jane.doe+news@example.co.uk today", "write to <EMAIL> today", id="email"),
    pytest.param("Grüße an müller@bücher.de!", "Grüße an <EMAIL>!", id="email-unicode"),
    pytest.param("mail:bob@example.com,", "mail:<EMAIL>,", id="email-punctuated"),
    pytest.param("call (415) 555-0132 now", "call <PHONE> now", id="phone-us-national"),
    pytest.param("call +44 20 7946 0958", "call <PHONE>", id="phone-international"),
    pytest.param("ruf 030 12345678 an", "ruf <PHONE> an", id="phone-de-national"),
    pytest.param("call +1-415-555-0132.", "call <PHONE>.", id="phone-dashed"),
    pytest.param("card 4111 1111 1111 1111 exp", "card <CARD> exp", id="card-spaced"),
    pytest.param("card 4111-1111-1111-1111", "card <CARD>", id="card-dashed"),
    pytest.param("card 5500000000000004;", "card <CARD>;", id="card-plain"),
    pytest.param("amex 3782 822463 10005", "amex <CARD>", id="card-amex"),
    pytest.param("ref 4111 1111 1111 1111 2024", "ref <CARD> 2024", id="card-then-year"),
    pytest.param("from 192.168.1.20.", "from <IP>.", id="ipv4"),
    pytest.param("from 2001:db8::8a2e:370:7334 ok", "from <IP> ok", id="ipv6"),
    pytest.param("via fe80::1%eth0: down", "via <IP>: down", id="ipv6-zone"),
    pytest.param("mapped ::ffff:192.0.2.1 here", "mapped <IP> here", id="ipv6-mapped-ipv4"),
    pytest.param("url [2001:db8::1]:443", "url [<IP>]:443", id="ipv6-bracketed"),
    pytest.param("IBAN DE89 3704 0044 0532 0130 00 please", "IBAN <IBAN> please", id="iban-spaced"),
    pytest.param("to GB82WEST12345698765432.", "to <IBAN>.", id="iban-compact"),
    pytest.param("iban fr1420041010050500013m02606", "iban <IBAN>", id="iban-lowercase"),
    pytest.param("ssn 123-45-6789", "ssn <SSN>", id="ssn"),
])
def test_each_identifier_is_replaced_by_its_placeholder(text: str, expected: str) -> None:
    assert MASKER.mask(text).text == expected


@pytest.mark.parametrize("text", [
    pytest.param("version 1.2.3 released 2024-01-15 at 10:30:45", id="version-date-time"),
    pytest.param("order #123456, qty 12, price $12.50, zip 94103-1234", id="small-numbers"),
    pytest.param("4111111111111112 fails the Luhn check", id="card-bad-luhn"),
    pytest.param("DE89370400440532013001 has a bad checksum", id="iban-bad-checksum"),
    pytest.param("999.1.1.1 is no address, nor is 1.2.3", id="not-ipv4"),
    pytest.param("std::vector<int> and a :: b and 12:30:45 and 00:1A:2B:3C:4D:5E", id="not-ipv6"),
    pytest.param("000-12-3456 and 666-12-3456 are never issued", id="not-ssn"),
    pytest.param("an email needs a domain: user@localhost", id="not-email"),
])
def test_look_alikes_are_left_alone(text: str) -> None:
    result = MASKER.mask(text)
    assert result.text == text
    assert result.counts == {}


def test_every_kind_in_one_text_is_counted() -> None:
    text = ("Jane (jane@example.com, +1 415 555 0132) paid with 4111 1111 1111 1111 from 10.0.0.7 and "
            "2001:db8::1, IBAN GB82 WEST 1234 5698 7654 32, SSN 123-45-6789; her friend is bob@example.org")
    result = MASKER.mask(text)
    assert result.text == ("Jane (<EMAIL>, <PHONE>) paid with <CARD> from <IP> and <IP>, IBAN <IBAN>, SSN <SSN>; "
                           "her friend is <EMAIL>")
    assert result.counts == {"email": 2, "phone": 1, "card": 1, "ip": 2, "iban": 1, "ssn": 1}


def test_an_earlier_type_wins_where_findings_overlap() -> None:
    # The digits of a card are a valid phone number too in some plans; the card must win, whole.
    assert MASKER.mask("4111111111111111").text == "<CARD>"
    # An e-mail's local part full of digits is not a phone number.
    assert MASKER.mask("4155550132@example.com").text == "<EMAIL>"


def test_masking_is_idempotent() -> None:
    once = MASKER.mask("jane@example.com 4111 1111 1111 1111 +44 20 7946 0958").text
    assert MASKER.mask(once).text == once
    assert MASKER.mask(once).counts == {}


def test_phone_regions_decide_which_national_numbers_are_found() -> None:
    text = "ruf 030 12345678 an"
    assert Masker(phone_regions=("US",)).mask(text).text == text
    assert Masker(phone_regions=("DE",)).mask(text).text == "ruf <PHONE> an"


def test_mask_all_sums_the_counts() -> None:
    texts, counts = MASKER.mask_all(["a@example.com", "nothing here", "b@example.com 10.1.1.1"])
    assert texts == ["<EMAIL>", "nothing here", "<EMAIL> <IP>"]
    assert counts == {"email": 2, "ip": 1}


@pytest.mark.parametrize(("requested", "tenant_default", "deployment_default", "expected"), [
    (True, False, False, True),
    (False, True, True, False),
    (None, True, False, True),
    (None, False, True, False),
    (None, None, True, True),
    (None, None, False, False),
])
def test_the_submission_then_the_tenant_then_the_deployment_decides(
    requested: bool | None, tenant_default: bool | None, deployment_default: bool, expected: bool
) -> None:
    assert Masker(by_default=deployment_default).applies(requested, tenant_default) is expected


def test_settings_build_the_masker_and_refuse_unknown_regions() -> None:
    settings = Settings(_env_file=None, mask_phone_regions="us, gb", mask_by_default=True)  # type: ignore[call-arg]
    masker = Masker.from_settings(settings)
    assert masker.phone_regions == ("US", "GB")
    assert masker.by_default is True
    with pytest.raises(ValidationError, match="MASK_PHONE_REGIONS"):
        Settings(_env_file=None, mask_phone_regions="US,XX")  # type: ignore[call-arg]
