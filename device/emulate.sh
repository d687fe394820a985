#!/usr/bin/env bash
# The board check without a board: edge-cbn's runtime-only install runs `edge-cbn stream` under an emulated
# 64-bit Raspberry Pi OS userland (qemu user mode) and must equal the x86-64 run (device/README.md).
# Needs a Debian x86-64 machine with apt (root) and the [convert] extra here; options: --help.
set -euo pipefail
exec "${PYTHON:-python3}" "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tools/board_check.py" "$@"
