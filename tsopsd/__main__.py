"""`python -m tsopsd` (and `torchrun -m tsopsd`) runs the CLI."""

from tsopsd.cli import main

if __name__ == "__main__":
    main()
