"""`python -m lacax.serve [flags]`: the same as `lacax serve [flags]`."""

import sys

from lacax.serve.serving import main

if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
