#!/usr/bin/env bash
# Create .venv-cuda (brian2cuda 1.0b1, Brian2 2.10, Python >= 3.12); see envs/make-env.sh.
exec bash "$(dirname "$0")/make-env.sh" cuda "$@"
