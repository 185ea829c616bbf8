#!/usr/bin/env bash
# Installs what leadstream needs on a fresh Debian machine: redis-server (and kcat, to look at topics;
# chromium, for the dashboard's browser test; gcc, for the compiled kernels) from Debian, a Python 3.11 virtualenv in
# .venv with leadstream and its pinned dependencies, and models/kernels.py compiled (deploy/build_native.py).
# The Kafka jars come from Maven Central on the first `leadstream up` (cached in ~/.cache/leadstream).
# Java 17 and Maven must be on the machine. Idempotent: a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

# chromium: the browser tier of the integration tests drives Debian's chromium with Playwright.
# gcc: compiles models/kernels.py (below).
if ! command -v redis-server >/dev/null || ! command -v kcat >/dev/null || ! command -v chromium >/dev/null \
    || ! command -v cc >/dev/null; then
  if [ "$(id -u)" != 0 ] && ! command -v sudo >/dev/null; then
    echo "install.sh: redis-server, kcat, chromium or gcc is missing; run as root: apt-get install redis-server kcat chromium gcc" >&2
    exit 1
  fi
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq redis-server kcat chromium gcc >/dev/null
fi
for tool in java mvn python3.11; do
  command -v "$tool" >/dev/null || { echo "install.sh: $tool is required (Java 17 + Maven for Kafka, Python 3.11)" >&2; exit 1; }
done

if [ ! -x .venv/bin/python ]; then
  python3.11 -m venv .venv
fi
# Reinstall only when pyproject.toml changed since the last install.
stamp=.venv/.leadstream-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
  touch "$stamp"
fi
# The serving loops of models/kernels.py compiled to C (Cython; the same results, faster): rebuilt
# unless built from the source as it is. Without a C compiler leadstream runs them as plain Python.
if ! .venv/bin/python deploy/build_native.py --check && ! .venv/bin/python deploy/build_native.py; then
  echo "install.sh: models/kernels.py not compiled (see above): it runs as plain Python, slower" >&2
fi
