#!/usr/bin/env bash
# Create .venv-genn (brian2genn 1.7, Brian2 2.5, numpy < 2); see envs/make-env.sh.
exec bash "$(dirname "$0")/make-env.sh" genn "$@"
