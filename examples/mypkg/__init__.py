"""The README's example package: run its command-line section from this folder (`examples/`)."""
