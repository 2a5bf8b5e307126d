"""Applications built on the library: ``demo`` (the Fashion-MNIST story behind ``dydit demo``) and
``bench`` (the inference-speed benchmark behind ``dydit bench``).

This layer sits between the command line and the library: :mod:`dydit.cli` and the scripts in
``benchmarks/`` import it; nothing in the library does.
"""
