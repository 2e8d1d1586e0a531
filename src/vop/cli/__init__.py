"""Command-line interface: `vop <command>`; each command group lives in its own module."""
