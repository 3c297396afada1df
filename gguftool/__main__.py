"""``python -m gguftool``: the same command as the ``gguftool`` console script."""
from .cli import main

if __name__ == "__main__":
    main(prog_name="gguftool")
