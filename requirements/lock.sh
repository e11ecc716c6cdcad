#!/usr/bin/env bash
# Refresh requirements/ci.lock, what .ci/run installs: every extra CI uses, at exact versions.
# Run after changing pyproject.toml's dependencies; commit the lock with that change.
set -euo pipefail
cd "$(dirname "$0")/.."
uv pip compile pyproject.toml --extra dev --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --override requirements/overrides.txt --find-links /opt/wheels --index-strategy unsafe-best-match \
    --no-header --output-file requirements/ci.lock
