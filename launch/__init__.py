"""Launchers: `launch.torchrun` (one node's torchrun command, used by slurm/*.sh and launch.submit) and
`launch.submit` (submitit)."""
