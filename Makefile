# The two commands of the README, and a few helpers. Every target does its own set-up.
.PHONY: run test setup setup-dev stack-up stack-down

# `make run ARM64=1`: the last simulated board is an ARM64 board (arm64 Python under qemu-user, docs/fleet.md)
ARM64 ?=

run: setup            ## set up; the whole loop on the embedded defaults (stack, 3 boards, retrain, rollout, bench)
	.venv/bin/nativelm stack up
	.venv/bin/nativelm fleet sim up$(if $(ARM64), --arm64 $(ARM64))
	.venv/bin/nativelm fleet provision
	.venv/bin/nativelm serve --background
	.venv/bin/nativelm run

test: setup-dev       ## set up with the test tools, then run the whole test suite
	.venv/bin/python -m pytest

setup:
	$(if $(ARM64),NATIVELM_ARM64=1 )bash infra/setup.sh

setup-dev:
	bash infra/setup.sh dev

stack-up: setup
	.venv/bin/nativelm stack up

stack-down: setup
	.venv/bin/nativelm stack down
