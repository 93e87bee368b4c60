"""Train or evaluate a robust explainer: ``python train.py fit -c configs/default.yaml``."""

from lightning_modules.cli import main

if __name__ == "__main__":
    main()
