"""The SGLang launcher's argument handling and the plugin entry's opt-in (no SGLang needed:
importing the integration package does not import SGLang)."""

from __future__ import annotations

import pytest

from emtransfer.integrations import sglang as et_sglang
from emtransfer.integrations.sglang.launch import translate_argv

CARRIER = ["--encoder-transfer-backend", "zmq_to_scheduler"]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (
            ["--encoder-only", "--encoder-transfer-backend", "emtransfer"],
            ["--encoder-only", *CARRIER],
        ),
        (["--encoder-transfer-backend=emtransfer", "--port", "1"], [*CARRIER, "--port", "1"]),
        (
            ["--language-only", "--encoder-urls", "http://e:1"],
            ["--language-only", "--encoder-urls", "http://e:1", *CARRIER],
        ),
        (["--encoder-transfer-backend", "zmq_to_scheduler"], CARRIER),
    ],
    ids=["flag", "flag=value", "absent", "carrier"],
)
def test_translate_argv(argv: list[str], want: list[str]) -> None:
    assert translate_argv(argv) == want


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["--encoder-transfer-backend", "mooncake"], "python -m sglang.launch_server for mooncake"),
        (
            ["--encoder-transfer-backend=zmq_to_tokenizer"],
            "use --encoder-transfer-backend emtransfer",
        ),
        (["--encoder-transfer-backend"], "needs a value"),
    ],
    ids=["mooncake", "zmq_to_tokenizer", "no-value"],
)
def test_translate_argv_refuses_other_backends(argv: list[str], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        translate_argv(argv)


@pytest.mark.timeout(10)
def test_plugin_does_nothing_unless_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(et_sglang.ENABLE_ENV, raising=False)
    et_sglang.sglang_plugin()
    assert not et_sglang.is_registered()
    monkeypatch.setenv(et_sglang.ENABLE_ENV, "0")
    et_sglang.sglang_plugin()
    assert not et_sglang.is_registered()
