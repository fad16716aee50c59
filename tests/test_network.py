"""Flaky networks: transient errors are retried with backoff, permanent ones are not, and a
stalled read costs one timeout per attempt. Servers run on 127.0.0.1 and are stopped by the test."""

from __future__ import annotations

import functools
import http.server
import threading
import time
from pathlib import Path

import pytest

from shardkit.errors import ShardFormatError, ShardIntegrityError, ShardkitError, ShardReadError
from shardkit.export import export_pixart
from shardkit.inspect import inspect_output
from shardkit.reader import ShardReader
from shardkit.storage import Retry, is_transient
from test_reader import write_synthetic_build

pytestmark = pytest.mark.timeout(120)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _Server:
    """A static file server on a fixed port that can be stopped and started again."""

    def __init__(self, folder: Path, handler=_QuietHandler):
        self.handler = functools.partial(handler, directory=str(folder))
        self.port = 0
        self.server: http.server.ThreadingHTTPServer | None = None
        self.start()

    def start(self) -> None:
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), self.handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _network_error(kind: str) -> BaseException:
    import aiohttp

    request = aiohttp.RequestInfo(url="http://x/shard.tar", method="GET", headers={}, real_url="http://x/shard.tar")
    if kind == "refused":  # as fsspec raises it: "not found", caused by the refused connection
        try:
            try:
                raise ConnectionRefusedError(111, "Connect call failed")
            except ConnectionRefusedError as exc:
                raise FileNotFoundError("http://x/shard.tar") from exc
        except FileNotFoundError as exc:
            return exc
    return aiohttp.ClientResponseError(request, (), status=int(kind))


@pytest.mark.parametrize("kind, transient", [("refused", True), ("500", True), ("503", True), ("429", True),
                                             ("404", False), ("403", False), ("400", False)])
def test_http_errors_are_classified(kind, transient):
    assert is_transient(_network_error(kind), "http://x/shard.tar") is transient


def test_other_errors_are_classified():
    url = "https://x/shard.tar"
    assert is_transient(ConnectionResetError(104, "reset"), url)
    assert is_transient(TimeoutError(), url)
    assert is_transient(ShardIntegrityError("sha256"), url)
    assert not is_transient(FileNotFoundError("gone"), url)  # a plain 404
    assert not is_transient(PermissionError("denied"), url)
    assert not is_transient(ShardFormatError("bad header"), url)
    assert not is_transient(TimeoutError(), "/local/shard.tar")  # local files are never retried


def test_the_retry_rule_backs_off_with_jitter_and_gives_up():
    waits = []
    rule = Retry(retries=3, backoff=0.01)
    with pytest.raises(ConnectionResetError):
        rule.run(lambda: (_ for _ in ()).throw(ConnectionResetError()), lambda exc: True,
                 lambda attempt, exc, delay: waits.append(delay))
    assert len(waits) == 3 and all(0.005 * 2 ** n <= wait < 0.01 * 2 ** n for n, wait in enumerate(waits))
    calls = []
    with pytest.raises(FileNotFoundError):  # permanent: one attempt
        rule.run(lambda: calls.append(1) or (_ for _ in ()).throw(FileNotFoundError()), lambda exc: False)
    assert calls == [1]


def test_a_server_restarted_mid_epoch_costs_retries_not_shards(toy_build):
    options = dict(batch_size=1, layout="dict", shuffle=False, latent="mean")
    local = [b["keys"] for b in ShardReader(toy_build, **options)]
    server = _Server(toy_build)
    try:
        dataset = ShardReader(server.url, retries=6, retry_backoff=0.2, timeout=5, on_error="skip", **options)
        keys, restarted = [], threading.Timer(1.0, server.start)
        for batch in dataset:
            keys.append(batch["keys"])
            if len(keys) == 2:  # down for a second, mid-epoch
                server.stop()
                restarted.start()
        restarted.join()
    finally:
        server.stop()
    assert keys == local
    assert dataset.stats.shards_failed == 0 and dataset.stats.retries >= 1


def _stalling_handler(release: threading.Event):
    class StallingHandler(_QuietHandler):
        def do_GET(self):
            if not self.path.endswith(".tar"):
                return super().do_GET()
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            release.wait(30)  # sends no byte of the body

    return StallingHandler


def test_a_stalled_read_is_cut_at_the_timeout_once_per_attempt(toy_build):
    release = threading.Event()
    server = _Server(toy_build, _stalling_handler(release))
    try:
        dataset = ShardReader(server.url, batch_size=1, timeout=1.0, retries=1, retry_backoff=0)
        started = time.monotonic()
        with pytest.raises(ShardReadError, match="Timeout"):
            list(dataset)
        elapsed = time.monotonic() - started
    finally:
        release.set()
        server.stop()
    assert dataset.stats.retries == 1
    assert 1.9 < elapsed < 3.5  # two attempts of one timeout each, not two timeouts each


def test_verify_and_export_from_a_stalled_server_end_with_one_clear_line(tmp_path):
    build = tmp_path / "build"
    write_synthetic_build(build, {"1.0": [2]})
    release = threading.Event()
    server = _Server(build, _stalling_handler(release))
    try:
        started = time.monotonic()
        report = inspect_output(server.url, verify_shards=True, timeout=0.5)
        assert report.verification.kinds() >= {"unreadable_shard"}
        with pytest.raises(ShardkitError, match="refusing to export.*unreadable_shard"):
            export_pixart(server.url, tmp_path / "dest", timeout=0.5)
        assert time.monotonic() - started < 20
    finally:
        release.set()
        server.stop()
