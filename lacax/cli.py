"""The `lacax` command: `lacax serve [flags]` starts the OpenAI-compatible server (`lacax.serve`)."""

from __future__ import annotations

import sys
from typing import Sequence

COMMANDS = ("serve",)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(f"usage: lacax {{{','.join(COMMANDS)}}} [flags]\n  serve   an OpenAI-compatible server over lacax "
          "generation (lacax serve --help)")
    return 0 if argv else 2
  command, rest = argv[0], argv[1:]
  if command == "serve":
    from lacax.serve import serving  # pylint: disable=g-import-not-at-top

    serving.logging.basicConfig(level=serving.logging.INFO)
    serving.serve(serving.build_parser().parse_args(rest))
    return 0
  print(f"lacax: unknown command {command!r}; expected one of {COMMANDS}", file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main())
