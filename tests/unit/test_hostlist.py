from __future__ import annotations

import pytest

from bootd.hostlist import HostlistError, compress, expand


def test_expand_ranges_keep_padding_and_order() -> None:
    assert expand("n[0000-0003],n0020") == ["n0000", "n0001", "n0002", "n0003", "n0020"]
    assert expand("n[8-11]") == ["n8", "n9", "n10", "n11"]
    assert expand("rack[1-2]-n[01-02]") == ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]
    assert expand("login1, n[0001,0003-0004]") == ["login1", "n0001", "n0003", "n0004"]
    assert expand("n0001,n0001") == ["n0001"]


@pytest.mark.parametrize("bad", ["n[0003-0001]", "n[00-", "n]0[", "n[]", "n[a-b]", ",", "n[0-9999999]"])
def test_bad_hostlists_are_refused(bad: str) -> None:
    with pytest.raises(HostlistError):
        expand(bad)


def test_compress_round_trips() -> None:
    names = expand("n[0000-0015],n0020,login1")
    assert compress(names) == "n[0000-0015,0020],login1"
    assert sorted(expand(compress(names))) == sorted(names)
    assert compress(["n0007"]) == "n0007"
