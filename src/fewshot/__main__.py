"""``python -m fewshot``: the ``fewshot`` command (also what ``torchrun -m fewshot`` runs)."""

from fewshot.cli import main

if __name__ == "__main__":
    main()
