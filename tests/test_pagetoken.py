"""The one page-token parser of ListVolumes and ListSnapshots."""
from __future__ import annotations

import pytest

from csi_perssd import ids
from csi_perssd.errors import Code, CsiError
from csi_perssd.pagetoken import token_after

VID = "pvol-" + "0" * 32


def test_token_after_returns_the_id_or_nothing() -> None:
    assert token_after("", "v1:", ids.volume_id) == ""
    assert token_after("v1:" + VID, "v1:", ids.volume_id) == VID


@pytest.mark.parametrize("bad", ["garbage", "s1:" + VID, "v1:../x", "v1:", "v1:" + VID + "/"])
def test_a_token_this_driver_did_not_issue_is_aborted(bad: str) -> None:
    with pytest.raises(CsiError) as e:
        token_after(bad, "v1:", ids.volume_id)
    assert e.value.code == Code.ABORTED and "was not issued by this driver" in e.value.message
