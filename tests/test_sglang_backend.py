"""emtransfer as SGLang's encoder transfer backend, on SGLang 0.5.23's real classes.

Two SGLang encoder processes (producers: SGLang's encoder HTTP app and MMEncoder pipeline,
delivering through ``EmtransferDelivery``) and one scheduler-side process (the consumer:
SGLang's tokenizer dispatch and its scheduler receiver loop, ``_process_waiting_requests``
with its gloo all-reduce, over ``EmtransferWaitingRequest``), all spawned, talking over
real sockets (HTTP for SGLang's control calls, emtransfer's tcp transport for the data).
The receiver request is polled as SGLang's scheduler polls it, from PENDING to SUCCESS,
FAIL (the encoder refused the input, the request was aborted, the producer was killed) and
TIMEOUT (SGLang's own wait deadline, and an emtransfer deadline); what arrives is compared
byte for byte with what the encoder staged, and both sides end with every block free.

SGLang is imported only in the children (with the torchvision stand-in); a failure to
import it fails these tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sglang_harness import SETTINGS, Child, consumer_main, producer_main, url

PENDING, SUCCESS, FAIL, TIMEOUT = 0, 1, -1, -2


class Procs:
    def __init__(self) -> None:
        self.producer = Child(producer_main, SETTINGS)
        self.victim = Child(producer_main, SETTINGS)  # the producer one test kills
        self.consumer = Child(consumer_main, SETTINGS)
        try:  # all three import SGLang at once
            self.encoder = self.producer.started()
            self.victim_info = self.victim.started()
            self.consumer.started()
            self.consumer.ask("scheduler", "main", self.encoder, {}, 60.0)
        except BaseException:
            self.close()
            raise

    def run(self, scheduler: str, rid: str, items: list[str], action: Any = None) -> Any:
        """Dispatch a request, tick the scheduler until it ends (after ``action``)."""
        until = "transferring" if action else "none"
        started = self.consumer.ask("start", scheduler, rid, items, until, True)
        assert started["statuses"] == [PENDING], started
        return self.consumer.ask("finish", rid, action)

    def settled(self, scheduler: str = "main") -> None:
        """Both sides are back to nothing in flight: every block free, no handle open, no
        request state left on the encoder, no registration, no send."""
        consumer = self.consumer.ask("settle", scheduler)
        assert consumer["open_handles"] == 0, consumer
        _full(consumer["pool"])
        producer = self.producer.ask("settle")
        _full(producer["pool"])
        assert producer["req_states"] == [] and producer["endpoints"] == [], producer
        assert producer["sends"] == [] and producer["open_handles"] == 0, producer
        assert producer["held_bytes"] == 0, producer

    def close(self) -> None:
        for child in (self.consumer, self.producer, self.victim):
            child.close()


def _full(pool: dict[str, Any]) -> None:
    assert pool["free"] == pool["blocks"] and pool["quarantined"] == 0, pool
    assert pool["waiters"] == 0 and not pool["leaks"], pool


@pytest.fixture(scope="module")
def procs() -> Iterator[Procs]:
    p = Procs()
    try:
        yield p
    finally:
        p.close()


@pytest.mark.timeout(120)
def test_register_is_version_checked_idempotent_and_reversible(procs: Procs) -> None:
    got = procs.consumer.ask("patch")
    assert got["registered"] and got["marked"] and got["idempotent"], got
    assert got["restored"] and got["unregister_idempotent"], got
    assert "SGLang 0.6.0 is installed" in got["refused"] and "0.5.23" in got["refused"], got
    assert got["refused_left_unpatched"] and got["forced"], got
    assert got["shape_problems"] == [
        "receiver.WaitingMMRequestStatus is not {'FAIL': -1, 'PENDING': 0, 'SUCCESS': 1, "
        "'TIMEOUT': -2}"
    ], got
    assert got["launch_child_registers"], got
    assert "replaced by someone else" in got["foreign_patch"], got
    assert got["still_registered"], got


@pytest.mark.timeout(120)
def test_payload_codec_carries_sglang_parts_exactly(procs: Procs) -> None:
    got = procs.consumer.ask("codec")
    assert got["values"] and got["part"] and got["error"] and got["empty"], got
    refusals = got["refusals"]
    assert all(v != "accepted" for v in refusals.values()), refusals
    assert "cannot carry a object" in refusals["object"], refusals
    assert "unknown dtype 'complex64'" in refusals["decode_dtype"], refusals
    problems = got["problems"]
    assert "no tensor attribute 'mrope_positions'" in problems["missing_field"], problems
    assert "metadata takes" in problems["too_large"], problems
    assert "no SGLang part" in problems["foreign_meta"], problems
    links = got["links"]
    assert links["pairs"] == {"http://a:1": "a:9100", "http://b:2": "10.0.0.2:9200"}, links
    assert links["json"] == {"http://a:1": "a:9100"} and links["empty"] == {}, links
    assert "expected url=host:port" in links["bad_pair"], links
    assert "not valid JSON" in links["bad_json"], links
    assert "must map encoder URLs" in links["bad_types"], links
    assert links["mapped"] == "a:9100" and links["by_port"] == "10.1.2.3:9300", links
    assert links["by_port_v6"] == "[fd00::1]:9300", links
    assert "EMTRANSFER_SGLANG_ENCODERS" in links["no_port"], links
    assert links["parts"] == [(0, 0), (1, 2), (2, 1)], links  # SGLang's part numbering


@pytest.mark.timeout(120)
def test_pending_to_success_byte_identical(procs: Procs) -> None:
    """Two images (one of 100 tokens: more than the 64-token default allocation, so it
    resumes) and a video, split over two encoders into three parts: every part's embedding,
    M-RoPE positions (a per-token field), delta, grids and video metadata arrive as staged."""
    items = [url("image", 40, 1), url("image", 100, 2), url("video", 30, 3)]
    got = procs.run("main", "rid-ok", items)
    assert got["kind"] == "success" and got["statuses"] == [PENDING, SUCCESS], got
    assert got["checks"] and all(got["checks"].values()), got["checks"]
    staged = procs.producer.ask("staged")
    assert len(got["digests"]) == 3, got["digests"]
    assert all(staged[rid] == d for rid, d in got["digests"].items()), (staged, got["digests"])
    procs.settled()


@pytest.mark.timeout(120)
def test_encoder_error_is_fail_with_its_message(procs: Procs) -> None:
    got = procs.run("main", "rid-refused", [url("fail", 10, 4)])
    assert got["kind"] == "aborted" and got["statuses"] == [PENDING, FAIL], got
    assert "this image is refused" in got["error_msg"] and got["error_code"] == 400, got
    assert got["code"] == 400 and got["open_parts"] == [], got
    procs.settled()


@pytest.mark.timeout(120)
def test_part_the_settings_cannot_carry_is_fail_at_once(procs: Procs) -> None:
    """A part without the per-token field the settings carry (M-RoPE positions): the
    delivery refuses it before anything moves and tells the rank why, instead of leaving it
    waiting for a payload that never comes."""
    got = procs.run("main", "rid-nomrope", [url("nomrope", 10, 5)])
    assert got["kind"] == "aborted" and got["statuses"] == [PENDING, FAIL], got
    # two messages race to the rank: the refused part with our reason (through emtransfer),
    # and SGLang's own 502 for the failed delivery (through its tokenizer). Either makes the
    # request FAIL at once; when ours comes first it says why
    if got["error_msg"].startswith("emtransfer: "):
        assert got["error_msg"].startswith("emtransfer: part 'rid-nomrope_local_part_0'"), got
        assert "no tensor attribute 'mrope_positions'" in got["error_msg"], got
        assert got["error_code"] == 400, got
    else:
        assert "rid-nomrope_local_part_0] embedding delivery failed" in got["error_msg"], got
        assert got["error_code"] == 502, got
    procs.settled()


@pytest.mark.timeout(120)
def test_abort_is_fail_and_frees_both_sides(procs: Procs) -> None:
    """Aborted while its receive waits (the encoder is still computing): FAIL at once, the
    receive given up; once the encoder finishes, its send finds no receiver and ends within
    init_timeout, and the encoder releases the request."""
    got = procs.run("main", "rid-abort", [url("hang", 20, 501)], action="abort")
    assert got["kind"] == "aborted" and got["statuses"] == [PENDING, FAIL], got
    assert got["error_msg"] == "Aborted by user" and got["open_parts"] == [], got
    procs.producer.ask("release", 501)
    procs.settled()


@pytest.mark.timeout(120)
def test_sglang_wait_deadline_is_timeout(procs: Procs) -> None:
    procs.consumer.ask("scheduler", "short", procs.encoder, {}, 1.0)
    got = procs.run("short", "rid-late", [url("hang", 20, 502)])
    assert got["kind"] == "aborted" and got["statuses"] == [PENDING, TIMEOUT], got
    assert got["code"] == 408 and "Timeout waiting for image embedding" in got["error"], got
    assert got["open_parts"] == [], got
    procs.producer.ask("release", 502)
    procs.settled("short")


@pytest.mark.timeout(120)
def test_emtransfer_deadline_is_timeout(procs: Procs) -> None:
    """The rank's own transfer deadline (chunk_timeout, 1 s here) passes first: the handle
    fails with TransferTimeout, which the request reports as SGLang's TIMEOUT."""
    procs.consumer.ask("scheduler", "deadline", procs.encoder, {"chunk_timeout": 1.0}, 60.0)
    got = procs.run("deadline", "rid-deadline", [url("hang", 20, 503)])
    assert got["kind"] == "aborted" and got["statuses"] == [PENDING, TIMEOUT], got
    assert "emtransfer: receiving" in got["error_msg"] and got["error_code"] == 504, got
    procs.producer.ask("release", 503)
    procs.settled("deadline")


@pytest.mark.timeout(120)
def test_producer_killed_is_fail(procs: Procs) -> None:
    """The encoder process dies while the rank waits for its part: the rank's emtransfer
    connection drops and the request fails (the tokenizer's /encode call is cut too; its
    dispatch error is held back so that the failure seen is emtransfer's)."""
    procs.consumer.ask("scheduler", "victim", procs.victim_info, {}, 60.0)
    started = procs.consumer.ask(
        "start", "victim", "rid-killed", [url("hang", 20, 504)], "transferring", False
    )
    assert started["statuses"] == [PENDING], started
    procs.victim.proc.kill()
    procs.victim.proc.join(10)
    got = procs.consumer.ask("finish", "rid-killed", None)
    assert got["kind"] == "aborted" and got["statuses"] == [PENDING, FAIL], got
    assert "emtransfer: receiving" in got["error_msg"] and got["error_code"] == 503, got
    consumer = procs.consumer.ask("settle", "victim")
    assert consumer["open_handles"] == 0, consumer
    _full(consumer["pool"])
