"""TLS on the control connection (standard-library ssl): server certificates verified by the
language node, mutual TLS when the encode node has a CA, and every misconfiguration refused
with a typed error naming the setting. Certificates are made per test run with openssl."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers_runtime import (
    assert_same_payload,
    make_payload,
    make_settings,
    wait_pools_clean,
    wait_until,
)

import emtransfer as et

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI"),
]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _ca(d: Path, name: str) -> None:
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=d)
    _openssl(
        "req", "-x509", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}", "-days", "2",
        "-out", f"{name}.pem", cwd=d,
    )  # fmt: skip


def _leaf(d: Path, name: str, ca: str, san: str) -> None:
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=d)
    _openssl(
        "req", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}", "-out", f"{name}.csr", cwd=d
    )
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "rogue")
    _leaf(d, "server", "ca", "IP:127.0.0.1,DNS:encode.example")
    _leaf(d, "client", "ca", "DNS:language.example")
    _leaf(d, "stranger", "rogue", "DNS:language.example")
    return d


def _pair(pki: Path, enc: dict[str, Any], lang: dict[str, Any]) -> tuple[et.Settings, et.Settings]:
    def paths(kw: dict[str, Any]) -> dict[str, Any]:
        return {k: (pki / v if k.startswith("tls_") and k != "tls_server_name" else v)
                for k, v in kw.items()}  # fmt: skip

    base = {"transport": "tcp", "bootstrap_timeout": 3.0}
    return make_settings(**base, **paths(enc)), make_settings(**base, **paths(lang))


SERVER = {"tls_cert": "server.pem", "tls_key": "server.key"}


async def _transfer(es: et.Settings, ls: et.Settings, address: str | None = None) -> None:
    async with et.EncodeNode(es, control="tcp") as enc, et.LanguageNode(ls) as lang:
        peer = await lang.connect(address or enc.address)
        pay = make_payload(150, seed=3)
        send = asyncio.create_task(enc.send("t", pay))
        got = await lang.receive("t", peer)
        await send
        assert_same_payload(got.tensors, pay)
        await wait_pools_clean(enc, lang)


async def test_tls_carries_the_control_connection(pki: Path) -> None:
    from test_control import Recorder

    es, ls = _pair(pki, SERVER, {"tls_ca": "ca.pem"})
    async with et.EncodeNode(es, control="tcp") as enc, et.LanguageNode(ls) as lang:
        async with Recorder(enc.address) as rec:
            peer = await lang.connect(rec.address)  # a relay that sees only ciphertext
            pay = make_payload(40, seed=1)
            send = asyncio.create_task(enc.send("t", pay))
            got = await lang.receive("t", peer)
            await send
            assert_same_payload(got.tensors, pay)
            for blob in (rec.up, rec.down):
                assert lang.node_id.encode() not in blob and enc.node_id.encode() not in blob
                assert b"hello" not in blob
            assert rec.up[:1] == b"\x16"  # a TLS handshake record opens the stream
        await wait_pools_clean(enc, lang)


async def test_mutual_tls_with_a_client_certificate(pki: Path) -> None:
    es, ls = _pair(
        pki,
        {**SERVER, "tls_ca": "ca.pem"},
        {"tls_ca": "ca.pem", "tls_cert": "client.pem", "tls_key": "client.key"},
    )
    await _transfer(es, ls)


async def test_the_server_name_can_differ_from_the_address(pki: Path) -> None:
    es, ls = _pair(pki, SERVER, {"tls_ca": "ca.pem", "tls_server_name": "encode.example"})
    await _transfer(es, ls)


@pytest.mark.parametrize(
    ("enc", "lang", "match"),  # match None: the words depend on which side notices first
    [
        # the encode node is not who the CA vouches for
        (SERVER, {"tls_ca": "rogue.pem"}, "certificate verify failed"),
        # the certificate names another host
        (SERVER, {"tls_ca": "ca.pem", "tls_server_name": "other.example"}, "certificate"),
        # mutual TLS: no client certificate, or one from another CA
        ({**SERVER, "tls_ca": "ca.pem"}, {"tls_ca": "ca.pem"}, None),
        (
            {**SERVER, "tls_ca": "ca.pem"},
            {"tls_ca": "ca.pem", "tls_cert": "stranger.pem", "tls_key": "stranger.key"},
            None,
        ),
        # a plain client against a TLS server, and the other way round
        (SERVER, {}, None),
        ({}, {"tls_ca": "ca.pem"}, None),
    ],
    ids=[
        "rogue-ca",
        "wrong-name",
        "no-client-cert",
        "stranger-cert",
        "plain-client",
        "plain-server",
    ],
)
async def test_a_failed_tls_handshake_is_a_typed_error(
    pki: Path, enc: dict[str, Any], lang: dict[str, Any], match: str | None
) -> None:
    es, ls = _pair(pki, enc, lang)
    async with et.EncodeNode(es, control="tcp") as e, et.LanguageNode(ls) as node:
        with pytest.raises((et.ConfigError, et.PeerLost, et.ProtocolError), match=match):
            await asyncio.wait_for(node.connect(e.address), 10)
        assert not node.peers
        await wait_until(lambda: not e.peers, what="the refused peer to be gone")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"tls_cert": "server.pem"}, "tls_cert and tls_key go together"),
        ({"tls_key": "server.key"}, "tls_cert and tls_key go together"),
        ({"tls_ca": "missing.pem"}, r"tls_ca=.*not a readable file"),
    ],
)
def test_tls_settings_are_checked(pki: Path, kw: dict[str, Any], match: str) -> None:
    with pytest.raises(et.ConfigError, match=match):
        make_settings(**{k: pki / v for k, v in kw.items()})


async def test_tls_files_that_are_not_pem_are_refused_at_start(pki: Path) -> None:
    (pki / "junk.pem").write_text("not a certificate\n")
    s = make_settings(transport="tcp", tls_cert=pki / "junk.pem", tls_key=pki / "server.key")
    with pytest.raises(et.ConfigError, match="tls_cert"):
        async with et.EncodeNode(s, control="tcp"):
            pass
    with pytest.raises(et.ConfigError, match="tls_ca"):
        et.LanguageNode(make_settings(transport="tcp", tls_ca=pki / "junk.pem"))
