"""The fleet: inventory, SSH transport, the board-side agent, the simulated fleet, provisioning,
status, rollout and on-board benchmarks. Import the submodules you need; this package imports
nothing, so reading the fleet's parameters stays cheap."""
