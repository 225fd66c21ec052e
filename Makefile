# The two commands of the README, and a few helpers. Every target does its own set-up.
.PHONY: run test setup setup-dev stack-up stack-down

run: setup            ## set up; the whole loop on the embedded defaults (stack, 3 boards, retrain, rollout, bench)
	.venv/bin/nativelm stack up
	.venv/bin/nativelm fleet sim up
	.venv/bin/nativelm fleet provision
	.venv/bin/nativelm serve --background
	.venv/bin/nativelm run

test: setup-dev       ## set up with the test tools, then run the whole test suite
	.venv/bin/python -m pytest

setup:
	bash infra/setup.sh

setup-dev:
	bash infra/setup.sh dev

stack-up: setup
	.venv/bin/nativelm stack up

stack-down: setup
	.venv/bin/nativelm stack down
