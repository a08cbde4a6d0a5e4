import sys

from polar_jax.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
