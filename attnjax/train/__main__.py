"""``python -m attnjax.train``: the command line (:mod:`attnjax.train.cli`) over the training loop."""

from attnjax.train.cli import main

if __name__ == "__main__":
    main()
