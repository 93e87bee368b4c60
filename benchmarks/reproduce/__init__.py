"""The reproduction study: does R2ET buy ranking robustness at equal accuracy?

``python -m benchmarks.reproduce --preset cpu --data-dir /tmp/cifar10_jpg --out docs/results``
pretrains a vanilla model, fine-tunes it with every objective (weights chosen on the validation
split), evaluates all of them on one fixed test subset and writes docs/results.md. See
``benchmarks/reproduce/presets.py`` for the presets and ``__main__.py`` for the options.
"""
