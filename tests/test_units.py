import pytest

from tilegrad import ConfigError, TilegradError, format_bytes, parse_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GiB", 2 * 1024**3),  # binary unit
        ("512 MB", 512 * 1000**2),  # decimal unit with a space
        ("1.5gb", 1_500_000_000),  # case-insensitive, fractional
        ("1e9", 1_000_000_000),  # bare number
        (4096, 4096),  # int passes through
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["two gigs", "2 GiBs", "-1GB", 0, True, None])
def test_parse_bytes_rejects_with_a_clear_message(bad):
    # an unreadable budget is a configuration mistake; MemoryBudgetError means "no plan fits"
    with pytest.raises(ConfigError) as info:
        parse_bytes(bad)
    assert isinstance(info.value, TilegradError)
    assert repr(bad) in str(info.value) or type(bad).__name__ in str(info.value)


def test_format_bytes_round_trip():
    assert format_bytes(parse_bytes("3GiB")) == "3.00 GiB"
    assert format_bytes(100) == "100 B"
