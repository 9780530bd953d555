"""``python -m bigbatch`` runs the command-line tool (used by torchrun launches)."""

from bigbatch.cli import main

if __name__ == "__main__":
    main()
