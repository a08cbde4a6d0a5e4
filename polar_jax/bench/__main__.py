import sys

from polar_jax.bench import main

sys.exit(main())
