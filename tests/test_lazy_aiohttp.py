"""aiohttp imported with its default contexts' CA roots loaded on first use (lazy_aiohttp)."""

from __future__ import annotations

import ssl
import subprocess
import sys

from batchrun.lazy_aiohttp import DeferredRootsContext

# each test imports aiohttp afresh: the test process has it loaded already (the fake)
CHECK = """
import ssl, sys
own_load = ssl.SSLContext.__dict__["load_default_certs"]
from batchrun.lazy_aiohttp import import_aiohttp
aiohttp = import_aiohttp()
import aiohttp.connector as connector
verified, unverified = connector._SSL_CONTEXT_VERIFIED, connector._SSL_CONTEXT_UNVERIFIED
assert ssl.SSLContext.__dict__["load_default_certs"] is own_load
assert "set_default_verify_paths" not in ssl.SSLContext.__dict__
reference = ssl.create_default_context()
other = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
other.load_default_certs()
assert other.cert_store_stats() == reference.cert_store_stats()
print(type(verified).__name__, type(unverified).__name__)
print(sorted(verified.__dict__.get("_deferred", [(None,)])[0][:1]))
{then}
"""


def run(then: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", CHECK.format(then=then)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_defaults_load_no_roots_at_import() -> None:
    """After the import aiohttp's two default contexts hold the root-loading calls, not the
    roots, and ssl.SSLContext has its own methods back."""
    lines = run("print(verified.__dict__['_deferred'] and unverified.__dict__['_deferred'])")
    assert lines[0] == "DeferredRootsContext DeferredRootsContext"
    assert lines[1] == "['load_default_certs']"
    assert lines[2] == "[('set_default_verify_paths', ())]"


def test_defaults_match_aiohttp_once_used() -> None:
    """Once a default context wraps a connection it is what aiohttp would have made at
    import: the system's roots, verification on, the same options."""
    lines = run(
        "import ssl\n"
        "verified.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname='example.org')\n"
        "print(verified.__dict__, verified.cert_store_stats() == reference.cert_store_stats())\n"
        "print(verified.verify_mode == ssl.CERT_REQUIRED, verified.check_hostname,\n"
        "      verified.options == reference.options,"
        " verified.verify_flags == reference.verify_flags)\n"
        "print(unverified.verify_mode == ssl.CERT_NONE,"
        " unverified.cert_store_stats() == reference.cert_store_stats())\n"
    )
    assert lines[2:] == ["{} True", "True True True True", "True True"]


def test_deferred_roots_load_once() -> None:
    """A context made here loads its deferred roots at the first wrap, and only then."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.__class__ = DeferredRootsContext
    context.__dict__["_deferred"] = [("load_default_certs", (ssl.Purpose.SERVER_AUTH,))]
    assert "_deferred" in context.__dict__
    context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="example.org")
    assert "_deferred" not in context.__dict__
    reference = ssl.create_default_context()
    assert context.cert_store_stats() == reference.cert_store_stats()
