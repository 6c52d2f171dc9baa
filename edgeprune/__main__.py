"""``python -m edgeprune``: the same CLI as the ``edgeprune`` console script."""

from edgeprune.cli import main

if __name__ == "__main__":
    main()
