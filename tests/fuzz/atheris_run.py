"""Coverage-guided fuzzing (atheris/libFuzzer) of the protocol cores.

    .venv/bin/python tests/fuzz/atheris_run.py TARGET [libFuzzer flags] [CORPUS_DIR]

TARGET is one of: tftp-codec, tftp-session, dhcp-codec, dhcp-classify.
`make test` runs each briefly (tests/fuzz/test_atheris.py); a longer run is e.g.
`-max_total_time=3600 tests/fuzz/corpus/tftp-session`. Any exception other than
RemoteProtocolError is a crash: libFuzzer writes the input to crash-*; keep it
as a regression test in tests/fuzz/regressions/.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
# The sources, not the compiled DHCP path (tools/compile.py): libFuzzer's coverage comes from instrumenting Python
# bytecode, which a C extension has none of. The compiled build is exercised by the hypothesis targets and the suite.
os.environ["BOOTD_PURE"] = "1"

with atheris.instrument_imports():
    import bootd.proto  # noqa: F401
    from tests.fuzz import dhcp_target, tftp_target


def tftp_session(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    request = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 120))
    size = fdp.ConsumeIntInRange(0, 50_000)
    steps = [fdp.ConsumeFloatInRange(0.0, 3.0) for _ in range(fdp.ConsumeIntInRange(1, 4))]
    datagrams = [fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40)) for _ in range(fdp.ConsumeIntInRange(0, 40))]
    tftp_target.session(request, size, datagrams, steps)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "tftp-codec": tftp_target.codec,
    "tftp-session": tftp_session,
    "dhcp-codec": dhcp_target.codec,
    "dhcp-classify": dhcp_target.classify,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer flags] [CORPUS_DIR]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
