"""The loop commands: the local stack, the dashboard (serve) and the whole loop (run)."""

from __future__ import annotations

import argparse
from pathlib import Path

from nativelm import stack as local_stack
from nativelm.cliargs import params_of
from nativelm.orchestration import serve as dashboard
from nativelm.orchestration.run import run_local, run_pipeline


def stack(args: argparse.Namespace) -> int:
    """Start, stop or show the local MLflow + Prefect servers."""
    params = params_of(args)
    if args.action == "down":  # the runner uses the servers: stop it first
        dashboard.serve_stop(params)
    action = {"up": local_stack.up, "down": local_stack.down, "status": local_stack.status}[args.action]
    for line in local_stack.render(action(params)):
        print(line)
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the pipeline flow (through Prefect and DVC) on the local stack and print a summary."""
    params = params_of(args)
    loop = run_local if args.local else run_pipeline
    for line in loop(params, Path(args.params or "params.yaml"), Path.cwd()):
        print(line)
    return 0


def serve(args: argparse.Namespace) -> int:
    """Register the deployments and run them: in the foreground, or as a background process."""
    params = params_of(args)
    if args.stop:
        status = dashboard.serve_stop(params)
    elif args.background:
        status = dashboard.serve_background(params, Path(args.params or "params.yaml"), Path.cwd())
    else:
        dashboard.serve_foreground(params, Path.cwd())
        return 0
    took = f" in {status.seconds:.1f} s" if status.seconds else ""
    pid = f"pid {status.pid}  " if status.pid else ""
    print(f"runner   {status.action}{took}  {pid}log {status.log_path}")
    if status.running:
        print(f"deployments: {', '.join(dashboard.deployment_ref(name) for name in dashboard.FLOWS)}")
        print(f"Prefect UI: {local_stack.prefect_ui_url(params)}/deployments")
    return 0


