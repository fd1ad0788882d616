"""Errors carry their meaning: every typed error says which HTTP status it maps to and whether
a retry may help, and a peer's refusal reaches the caller as its own type (an encoder refusing
the input: JobRefused, 400; failing on its own: EncoderFailed, 502; a limit or a shutdown:
Unavailable, 503), not as a TransferAborted whose text must be parsed."""

from __future__ import annotations

from typing import Any

import pytest
from helpers_runtime import make_payload, make_settings, wait_pools_clean

import emtransfer as et
from emtransfer.encoders import JobError
from emtransfer.server.common import failure_from

pytestmark = pytest.mark.timeout(30)


def encoder(job: dict[str, Any]) -> Any:
    if job.get("refuse"):
        raise JobError("the image cannot be decoded")
    if job.get("crash"):
        raise RuntimeError("CUDA out of memory in the vision tower")
    return make_payload(job["num_tokens"], seed=1)


@pytest.mark.parametrize(
    ("cls", "status", "retryable"),
    [
        (et.TransferError, 502, False),
        (et.InvalidRequest, 400, False),
        (et.PayloadError, 400, False),
        (et.RidInFlight, 409, False),
        (et.ConfigError, 400, False),
        (et.CapacityError, 503, True),
        (et.AllocationTimeout, 503, True),
        (et.TransferTimeout, 504, True),
        (et.PeerLost, 503, True),
        (et.Unavailable, 503, True),
        (et.JobRefused, 400, False),
        (et.EncoderFailed, 502, False),
        (et.TransferAborted, 502, False),
        (et.ProtocolError, 502, False),
    ],
)
def test_every_error_says_its_status_and_whether_to_retry(
    cls: type[et.TransferError], status: int, retryable: bool
) -> None:
    assert (cls.http_status, cls.retryable) == (status, retryable)
    f = failure_from(cls("why"))  # the servers map by type
    assert f.status == status and f.kind == cls.kind


@pytest.mark.parametrize("transport", ["local", "tcp"])
async def test_a_peer_s_refusals_arrive_typed(transport: str) -> None:
    s = make_settings(transport=transport, max_held_mib=0.01)  # ~10 KiB held at most
    control = "tcp" if transport == "tcp" else "local"  # tcp: the kinds cross the wire codec
    async with (
        et.EncodeNode(s, encoder=encoder, control=control) as enc,
        et.LanguageNode(s) as lang,
    ):
        peer = await lang.connect(enc.address)
        with pytest.raises(et.JobRefused, match="cannot be decoded") as refused:
            await lang.encode("bad-image", peer, {"refuse": True})
        assert failure_from(refused.value).status == 400
        with pytest.raises(et.EncoderFailed, match="out of memory") as failed:
            await lang.encode("crash", peer, {"crash": True})
        assert failure_from(failed.value).status == 502
        with pytest.raises(et.Unavailable, match="max_held_mib") as full:
            await lang.encode("too-big", peer, {"num_tokens": 500})  # 500 x 56 bytes > 10 KiB
        assert full.value.retryable and failure_from(full.value).status == 503
        got = await lang.encode("fine", peer, {"num_tokens": 20})  # and serving goes on
        assert got.num_tokens == 20
        await wait_pools_clean(enc, lang)


async def test_a_node_shutting_down_is_unavailable() -> None:
    s = make_settings()
    async with et.EncodeNode(s) as enc:
        async with et.LanguageNode(s) as lang:
            peer = await lang.connect(enc.address)
        with pytest.raises(et.Unavailable, match="closing") as closing:
            await lang.receive("late", peer)
        assert closing.value.retryable and failure_from(closing.value).status == 503
        with pytest.raises(et.Unavailable, match="closing"):
            await enc.close()  # and the encode side says the same to a late send()
            await enc.send("late", make_payload(4))
