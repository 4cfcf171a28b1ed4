"""`python -m clt_forge <stage> ...` behaves as `clt <stage> ...` (so torchrun -m clt_forge works)."""

from clt_forge.cli import main

if __name__ == "__main__":
    main()
