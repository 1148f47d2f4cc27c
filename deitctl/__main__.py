"""``python -m deitctl`` (and ``torchrun -m deitctl``)."""

from deitctl.cli import main

if __name__ == "__main__":
    main()
