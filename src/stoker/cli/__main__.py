"""``python -m stoker.cli``: the same as the ``stoker`` console script."""

from stoker.cli import main

if __name__ == "__main__":
    main()
