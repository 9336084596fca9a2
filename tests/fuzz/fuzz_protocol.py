"""The data plane's fuzz target (atheris, libFuzzer options and corpus directories).

    python tests/fuzz/fuzz_protocol.py -max_total_time=3600 -dict=tests/fuzz/http.dict \
        NEW_CORPUS_DIR tests/fuzz/corpus

The input format and the invariants are in tests/fuzz/harness.py.
"""

from __future__ import annotations

import os
import sys

import atheris

# Run as a script: the repository root is not on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

with atheris.instrument_imports(include=["proxy", "tests.fuzz"]):
    from tests.fuzz.harness import Runner

runner = Runner()


def test_one_input(data: bytes) -> None:
    runner.one(data)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
