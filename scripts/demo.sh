#!/usr/bin/env bash
# Installs relaykern and relays one prompt between a tiny random SLM and LLM built on the fly (no download). A
# random SLM never asks for help by itself, so the demo makes it write <call>6</call> after its first 4 tokens.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
relaykern generate --tiny --force-call-at 4 --force-call-n 6 --max-tokens 24 --prompt "What is 17 * 23?"
