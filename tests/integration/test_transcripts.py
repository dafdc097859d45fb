"""The bytes a client sees in handshakes and refusals, pinned: every case of
tests/golden/transcripts.py replayed through a real proxy gives exactly the recorded transcript
(Connection.Start, Tune, Open-Ok, each refusal's Connection.Close with its code and text)."""

from __future__ import annotations

import json

import pytest

from tests.golden import transcripts

pytestmark = pytest.mark.proxy_only

GOLDEN = json.loads(transcripts.OUT.read_text())


@pytest.fixture(scope="module")
def proxies(tmp_path_factory):
    procs = transcripts.start_proxies(tmp_path_factory.mktemp("transcripts"))
    yield procs
    for proc in procs.values():
        proc.stop()


def test_every_case_has_a_transcript():
    assert sorted(GOLDEN) == sorted(transcripts.CASES)


@pytest.mark.parametrize("case", sorted(transcripts.CASES))
def test_transcript(proxies, case):
    config, steps = transcripts.CASES[case]
    proc = proxies[config]
    got = transcripts.run_case(proc.host, proc.port, steps)
    assert got.hex() == GOLDEN[case], f"{case}: the proxy's bytes differ from the recorded transcript"
